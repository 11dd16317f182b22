"""Adapters that plug the CAL-GAN discriminator into other super-resolution trainers.

Each adapter is an optional import: nothing here imports a third-party trainer until its own
submodule is imported.

- :mod:`calgan_fast.integrations.basicsr`: registers the discriminator and a ``CALGANModel`` in
  BasicSR's registries and runs BasicSR's own training pipeline
  (``python -m calgan_fast.integrations.basicsr -opt X.yml``). Install with
  ``pip install "calgan_fast[basicsr]"``.

traiNNer-redux, neosr and hand-written loops need no adapter: they call the public API
(:class:`calgan_fast.CALGANDiscriminator`, :func:`calgan_fast.losses.discriminator_loss`,
:func:`calgan_fast.losses.generator_adversarial_loss`); ``examples/minimal_loop.py`` shows the wiring.
"""
