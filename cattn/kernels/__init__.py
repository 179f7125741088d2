"""Pure @triton.jit code. Nothing here allocates, checks or picks a config: see `cattn.launch`."""
