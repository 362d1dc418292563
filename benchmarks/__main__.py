"""``python -m benchmarks``: the speed suite (metalab vs the learn2learn-style reference, same run).

The accuracy benchmarks take longer and write markdown tables; run them by name:
``python -m benchmarks.zoo_omniglot`` and ``python -m benchmarks.sinusoid``.
"""

from benchmarks.speed import main

main()
