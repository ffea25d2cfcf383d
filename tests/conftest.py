"""Strict JAX for every test: a [C] weight broadcast against [C, d] raises."""

import os

# Four simulated CPU devices so that sharded-equals-unsharded tests can run; set
# before JAX initializes its backend.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')

import jax  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')
