"""The tools around the core: the benchmarks, the demo, the self-test, plots, synthetic CMT scenes.

`benchmark` (``python -m sparse_bias.tools.benchmark``), `aqr_benchmark`, `demo`, `selftest` (each a command line
whose ``main(argv)`` runs through `cli.run_cli`), `plotting`, `synthetic` (CMT configurations, cameras, scenes),
`memory` (free RAM, the dense-bias variant's need) and `cli` (what the command lines share). The tools import
the core; the core never imports a tool. The old paths (``sparse_bias.tools.benchmark``, ``sparse_bias.tools.synthetic``,
...) are thin entry modules re-exporting these.
"""
