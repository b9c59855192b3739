import sys

from magistral_jax.cli import main

sys.exit(main())
