"""What a run needs from the machine around it, beside the core: its folder's lock
(`trainer.runs.lock`) and its CPU thread count (`trainer.runs.threads`)."""
