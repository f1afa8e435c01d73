"""``ralu-bench speed``: how fast the RALU runtime really is, and where its time goes.

For every shipped schedule (or ``--schedules``) the benchmark puts side by side:

* the FLOPs speed-up on the real architectures (:mod:`ralu.calibrate.flops`, both
  conventions) and the paper's figure where the paper has one;
* the FLOPs speed-up of the configuration actually run (the same reduced models, counted with
  :func:`ralu.calibrate.flops.counting.count_flops` on the meta device at every stage's token count,
  plus the edge-detection decode);
* the measured wall-clock speed-up of the family's RALU pipeline (``RALUFluxPipeline``,
  ``RALUStableDiffusion3Pipeline``, ``RALUFluxKontextPipeline``, ``RALUChromaPipeline``,
  ``RALUFlux2Pipeline``, ``RALUFlux2KleinPipeline``, ``RALUQwenImagePipeline``; built with
  ``from_pipe``) against its plain diffusers pipeline with the schedule's base steps, in the same process, same prompt embeddings, same
  resolution, ``output_type="latent"`` for both (no final decode in either): median of
  ``--repeats`` runs after an untimed warm-up, baseline and RALU runs interleaved so that a
  change of machine load hits both;
* the runtime's own overhead (:mod:`ralu.runtime.profiling` sections: edge decode, edge
  selection, noise, token gather/scatter, positions) as a fraction of the RALU time;
* peak memory of a RALU call relative to a baseline call (and the edge decode's own peak);
* step caches (unless ``--no-caches``; :mod:`.caches`): every schedule with each diffusers cache
  its family supports, at the quality harness's settings (FLUX: first_block, taylorseer,
  magcache with per-stage ratios measured on other prompt embeddings and noise; SD3:
  taylorseer, magcache; the other families: what their adapter in :mod:`.families` declares), and beside them the plain pipeline at the step count of the same
  FLOPs budget, uncached and with the caches the quality harness runs on it (FLUX:
  first_block, taylorseer; MagCache's ratio table belongs to RALU's stages, and SD3's plain
  pipeline opens no cache context).  Per row: wall and CPU-time speed-up against the uncached
  baseline, the transformer's linear FLOPs that really executed (forward hooks on every
  ``nn.Linear``, in an untimed call) and the speed-up they imply, and the gain over the same
  method uncached;
* a compiled transformer (``--compile [BACKEND]``, default inductor; ``--quick`` always, with
  ``aot_eager``; :mod:`.compiled`): the plain pipeline and every schedule with
  ``transformer.compile(backend=...)``, compiled in untimed warm-up calls, with the graphs
  compiled, graph breaks and recompiles during the timed calls (dynamo's counters); a
  method whose compilation fails on the device says why in one line.

Configurations (``--quick`` and ``--widths``): see :func:`.config.make_config` and the report.  Peak
memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the call;
on CPU the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
above the resident set before the call, with glibc told to serve every allocation of 64 KiB
or more with its own ``mmap`` (and to return freed memory), so that the resident set follows
the live tensors.  Memory is measured after all timing (that allocator setting slows
allocation), on runs with one step per stage / one baseline step: every step of a stage
allocates the same tensors, so the peak does not depend on the step count.  The cache and
compile rows are timed after the summary's rows and before the memory measurement.

Every family is one declarative adapter (:mod:`.families`: the reduced-width rule for its
registry config, its prompt tensors, guidance, transformer inputs and caches); the pipeline,
transformer and VAE classes and the real configs come from :mod:`ralu.runtime.models`.

Modules: :mod:`.args` (the command line, cheap), :mod:`.families` (the adapters), :mod:`.config` (configurations), :mod:`.models`
(models and pipelines), :mod:`.cost` (FLOPs), :mod:`.measure` (timing, overhead, memory),
:mod:`.caches` (the step-cache rows), :mod:`.compiled` (the compiled rows),
:mod:`.run` (the benchmark and its files), :mod:`.schema` (the typed report), :mod:`.report`
(its Markdown).
"""
