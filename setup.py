"""recbole-blossom: BlossomRec sparse attention as a RecBole plugin.

Install (no ray):  pip install torch==2.13.0 && pip install --no-deps recbole==1.2.1 && pip install -e ".[test]"
RecBole itself is installed with --no-deps because its metadata pins ray<=2.6.3, which has no wheel for
Python 3.12 and breaks under numpy 2; everything RecBole needs besides ray is listed below.
"""

from setuptools import setup

setup(
    name="recbole-blossom",
    version="0.1.0",
    description="BlossomRec block-level fused sparse attention for RecBole sequential recommenders",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["recbole_blossom", "recbole_blossom.model", "recbole_blossom.ops", "recbole_blossom.properties"],
    package_dir={"recbole_blossom.properties": "properties"},
    package_data={"recbole_blossom.properties": ["*.yaml", "model/*.yaml", "dataset/*.yaml"]},
    py_modules=[],
    install_requires=[
        # recbole==1.2.1 is required too: install it with --no-deps (see above)
        "torch>=2.6",
        "numpy>=1.26",
        "scipy>=1.10",
        "pandas>=2.2",
        "tqdm>=4.48",
        "colorlog==4.7.2",  # RecBole 1.2.1 pins these two
        "colorama==0.4.4",
        "scikit-learn>=1.3",
        "pyyaml>=6.0",
        "tensorboard>=2.14",
        "thop>=0.1.1.post2207130030",
        "tabulate>=0.9",
        "plotly>=5.0",
        "texttable>=1.6",
        "psutil>=5.9",
        "hyperopt>=0.2.7",
        "matplotlib>=3.7",
    ],
    extras_require={"test": ["pytest>=7"]},
)
