"""The engine's device half: runs the host half's plans on a model's mesh. Imports jax; never the checkpoint
formats (a model arrives as `model.LoadedModel`).

  runner      `JaxRunner`: executes plans as calls of the jitted steps at bucketed shapes
  steps       the jitted prefill / copy_page / insert / resume / forward + sample_step / set_masks / release
  state       the decode state declared once: KV page pool, per-slot sequence and sampling rows
  sampling    on-device sampling over those rows
  warmup      which step variants exist, which must be ready before serving, the rest in the background
  executables step executables compiled in parallel, saved and loaded by key
  formulation the int8 matmuls' arithmetic, chosen on the machine
  build       `build_engine`: model -> runner -> warm-up -> started scheduler
  roofline    floors of a decode step, for the benchmarks
"""
