"""wmgen: GPT-2 text generation through a bounded, inspectable working memory."""

__version__ = "0.1.0"
