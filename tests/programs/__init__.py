"""Training programs written for torch.distributed.rpc, run unchanged (but for
their imports) on torchrpc or on torch.distributed.rpc.

Each module has `run(rank, world_size, port)`, which does init_rpc ...
shutdown and returns a checkable result on rank 0, and most have a local
`reference(world_size)` that computes the same result without RPC.
`launch.run_program(...)` runs one on worker processes; see backend.py for
the import switch (env RPC_BACKEND=torchrpc|torch).
"""
