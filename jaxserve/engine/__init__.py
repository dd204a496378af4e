"""The engine's host half: continuous batching decided on the host, executed by a runner. No jax here (the
device half is `jaxserve.device`), so the HTTP layer and the scheduler load without it.

  types       what goes in and comes out (requests, sampling params, deltas, usage, errors)
  plan        a step's device work as plain data (StepPlan, SamplePlan) and its fixed-shape buffers
  contract    the device side as a type (`Runner`): execute a StepPlan, sample_tokens for a SamplePlan
  scheduler   `Scheduler`: the loop on its own thread, admission, preemption; it makes the plans
  kv          `KVManager`: each slot's pages, prefix lookups, sharing, growth, publishing, freeing
  pages       the page pool: free pages, reference counts, the prefix cache, LRU eviction
  lifecycle   a request's host-side states and what it emits
  text        incremental detokenizing and stop strings
  grammar     structured outputs: response_format -> llguidance grammar, one matcher per choice, packed masks
  bridge      waiting for results: `generate` (asyncio), `stream` / `complete` (blocking)
"""
