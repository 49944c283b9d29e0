"""The merge stage: the adapter folded into the 16-bit base one safetensors shard at a time (stage,
safetensors_stream), then checked against the adapter on the 4-bit base (verify).
"""
