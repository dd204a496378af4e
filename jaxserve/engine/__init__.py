"""The engine: continuous batching over jitted device steps.

  types       what goes in and comes out (requests, sampling params, deltas, usage, errors); no jax
  contract    the device side as a type (`Core`): prefill, copy_page, insert, resume, forward + sample,
              set_masks, release
  state       the decode state declared once: KV page pool, per-slot sequence and sampling rows
  sampling    on-device sampling over those rows
  steps       the jitted steps at module level
  core        `JaxCore`: the contract over the steps, with shape buckets and warm-up
  pages       the KV page pool's bookkeeping: free pages, reference counts, the prefix cache
  lifecycle   a request's host-side states and what it emits
  scheduler   `Scheduler`: the loop on its own thread, the slot and page tables
  executables step executables compiled in parallel, saved and loaded by key
  formulation the int8 matmuls' arithmetic, chosen on the machine
  bridge      waiting for results: `generate` (asyncio), `stream` / `complete` (blocking)
  text        incremental detokenizing and stop strings
  grammar     structured outputs: response_format -> llguidance grammar, one matcher per choice, packed masks
  build       `build_engine`: model -> core -> started scheduler
  roofline    floors of a decode step, for the benchmarks

Importing this package loads no jax: the HTTP layer imports `types` and `bridge` only.
"""
