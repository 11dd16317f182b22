"""``python -m calgan_fast.integrations.basicsr -opt X.yml [BasicSR options]``: BasicSR's training
pipeline with the CAL-GAN discriminator and model registered."""

from calgan_fast.integrations.basicsr import main

if __name__ == "__main__":
    main()
