"""Multi-turn trace replay: workloads, the job queue, a simulated store and the paper's experiments."""
from cattn.replay.costmodel import MODELS, CostModel, Hardware, ModelShape, model_shape
from cattn.replay.queue import Job, JobQueue
from cattn.replay.sim import simulate
from cattn.replay.trace import read_trace, write_trace
from cattn.replay.workload import ArrivalConfig, SyntheticConfig, schedule, synthetic_conversations

__all__ = ["MODELS", "CostModel", "Hardware", "ModelShape", "model_shape", "Job", "JobQueue", "simulate",
           "read_trace", "write_trace", "ArrivalConfig", "SyntheticConfig", "schedule", "synthetic_conversations"]
