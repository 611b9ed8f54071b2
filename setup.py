from setuptools import find_packages, setup

setup(
    name="sbr",
    version="0.1.0",
    description="SEED-Bench-R1 from scratch: GRPO vs SFT post-training of Qwen2-VL on egocentric planning",
    packages=find_packages(include=["sbr", "sbr.*"]),
    package_data={"sbr": ["configs/*.json"]},   # published model configs: a dry run plans them offline
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "transformers>=5.24,<5.25",   # Qwen2-VL's 5.x API (mm_token_type_ids, cache=) is what sbr is tested on
        "decord>=0.6",
        "numpy",
        "einops",
        "tensorboard",
        "pillow",                      # reads the observation .png images
    ],
    extras_require={
        "gpu": ["flash-attn"],                   # pip install flash-attn --no-build-isolation
        "tiny": ["av"],                          # writes the tiny default's .mp4 clips
        "plot": ["matplotlib"],                  # the CPU-scale reproduction's curves.png
        "dev": ["av", "pytest", "torchvision", "matplotlib"],  # torchvision: the HF processor (parity tests);
                                                               # matplotlib: the figures' tests
    },
)
