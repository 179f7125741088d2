"""The device tier: sessions' first layers kept in device pages between turns."""
