"""lctrain: distributed long-context training of hybrid linear-attention language models."""
import warnings

# megatron-core warns at import that its optional fused paths (Transformer Engine, Apex) are absent; lctrain does not
# use them, and the warning would bury the one-line errors of the command line.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

__version__ = "0.1.0"
