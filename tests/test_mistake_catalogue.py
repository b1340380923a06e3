"""docs/mistakes.md is generated from verify/mistakes.py: the page and the code never disagree."""

from pathlib import Path

from gemma2_ref.verify.mistakes import catalogue_markdown

PAGE = Path(__file__).resolve().parents[1] / "docs" / "mistakes.md"


def test_the_catalogue_page_is_the_code_s_catalogue():
    assert PAGE.read_text() == catalogue_markdown(), (
        "docs/mistakes.md is stale: regenerate it with `python -m gemma2_ref.verify.mistakes > docs/mistakes.md`")


def test_every_issue_28_name_is_in_the_catalogue_with_its_thread():
    page = PAGE.read_text()
    for name, thread in [("norm_swap", "TensorRT-LLM #1984"), ("norm_cast_before_scale", "gemma_pytorch #67"),
                         ("norm_scale_in_bf16", "vLLM #53203"), ("norm_variance_in_bf16", "SGLang #27540"),
                         ("decode_window_from_query", "keras-hub #1738"),
                         ("decode_positions_from_sliding_cache", "transformers #38156"),
                         ("prefill_chunk_overflows_ring", "executorch #20346"), ("fp16_overflow", "llama.cpp #9166"),
                         ("logits_shifted", "TransformerLens #650"), ("special_tokens_not_parsed", "llama.cpp #8244"),
                         ("add_space_prefix", "llama.cpp #8248"), ("whitespace_runs_split", "llama.cpp #8228"),
                         ("no_byte_fallback", "byte_fallback"), ("stop_without_end_of_turn", "mlx-swift-examples #89")]:
        row = next((line for line in page.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None and thread in row, name
