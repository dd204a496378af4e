"""One model across several processes (hosts), with JAX's own multi-controller runtime (`jax.distributed`).

    group      joining: the checkpoint prepared once, `jax.distributed.initialize` with bounded timeouts
    channel    frames from process 0 to the others: each plan as bytes, over a JAX collective
    leader     process 0's hooks in its runner: every plan goes to the others before it runs here
    follower   the loop of every other process: receive a plan, run the same steps on its shards
    watchdog   liveness and progress through the coordination service: a process dead or hung ends the group

Process 0 serves HTTP and runs the scheduler; the others open no port (see README, "More than one host").
"""
