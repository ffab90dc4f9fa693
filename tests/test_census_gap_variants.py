"""Config paths of the issue-11 gap families that the census's default and shrunk configs do not
reach, each checked against transformers' own parameter count (meta device):
- GLM-5 (glm_moe_dsa) without `indexer_types`: the indexer schedule derived from
  index_topk_freq / index_skip_topk_offset / index_topk_pattern as GlmMoeDsaConfig derives it;
- HY-V4 without `indexer_types` (its own default pattern);
- A.X-K2 without `mlp_layer_types` (first_k_dense_replace and moe_layer_freq);
- Gemma 4 text with KV-shared layers, K = V full-attention layers, the double-wide MLP and the
  global head size derived from global_head_dim / num_global_key_value_heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from census_reference import build, param_count, shrunk_config

import moetool


def _count(tmp_path, config: dict) -> int:
    p = tmp_path / "config.json"
    p.write_text(json.dumps(config))
    return moetool.count(str(p)).total_params


def _base(mt: str, drop: tuple[str, ...] = ()) -> dict:
    cfg = shrunk_config(mt)
    for k in drop:
        cfg.pop(k, None)
    return cfg


VARIANTS = {
    "glm_moe_dsa-freq": ("glm_moe_dsa", ("indexer_types", "layer_types"), dict(num_hidden_layers=5, index_topk_freq=2,
                                                                 index_skip_topk_offset=1,
                                                                 mlp_layer_types=["dense"] + ["sparse"] * 4)),
    "glm_moe_dsa-pattern": ("glm_moe_dsa", ("indexer_types",), dict(index_topk_pattern="FSF")),
    "hy_v4-default-indexer": ("hy_v4", ("indexer_types", "layer_types"), dict(num_hidden_layers=6, mlp_layer_types=["dense"] + ["sparse"] * 5)),
    "axk2-moe-freq": ("axk2", ("mlp_layer_types", "layer_types"), dict(num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2)),
    "gemma4-kv-shared": ("gemma4_text", (), dict(
        num_hidden_layers=4, num_kv_shared_layers=2, attention_k_eq_v=True, use_double_wide_mlp=True,
        layer_types=["sliding_attention", "full_attention"] * 2,
        per_layer_config={"1": {"head_dim": 16, "num_key_value_heads": 1}, "3": {"head_dim": 16, "num_key_value_heads": 1}})),
    "gemma4-global-dims": ("gemma4_text", ("per_layer_config",), dict(
        num_hidden_layers=4, num_kv_shared_layers=2, attention_k_eq_v=False, global_head_dim=16,
        num_global_key_value_heads=1, layer_types=["sliding_attention", "full_attention"] * 2)),
    # Inkling: the default layer pattern (every 6th layer full, its own heads / head size / relative
    # extent), dense MLP layers (dense_mlp_idx), and `dense_intermediate_size` (then
    # intermediate_size is the experts' width)
    "inkling-default-pattern": ("inkling_text", ("layer_types", "mlp_layer_types"), dict(
        num_hidden_layers=7, swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=16,
        sliding_window_size=32, rel_extent=64, dense_mlp_idx=2, n_shared_experts=2)),
    "inkling-dense-intermediate": ("inkling_text", ("moe_intermediate_size",), dict(
        intermediate_size=16, dense_intermediate_size=40, local_layer_ids=[1], swa_num_attention_heads=2,
        swa_num_key_value_heads=2, swa_head_dim=8, mlp_layer_types=["dense", "sparse", "sparse"], num_mtp_layers=1)),
    # dots3 from an original config.json: no per_layer_config (the sliding layers' MLA from swa_*),
    # no layer_types (layers 0, 1, 5 full with the indexer, 2-4 sliding), no mlp_layer_types
    # (first_k_dense_replace and moe_layer_freq); and use_dsa false (full attention, no indexer)
    "dots3-swa-fields": ("dots3_note_text", ("per_layer_config", "layer_types", "mlp_layer_types"), dict(
        num_hidden_layers=6, swa_num_attention_heads=2, swa_num_key_value_heads=2, swa_q_lora_rank=8, swa_kv_lora_rank=12,
        swa_head_dim=12, swa_qk_nope_head_dim=8, swa_v_head_dim=4, first_k_dense_replace=2, moe_layer_freq=2,
        moe_shared_expert_intermediate_size=12)),
    # Inkling 2: the default pattern (layer 5 full: dynamic K / V convolutions, q / k / v input norms,
    # 3 residual queries) with sliding layers of their own heads / head size / window
    "inkling2-default-pattern": ("inkling2_text", ("layer_types",), dict(
        num_hidden_layers=7, swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=16,
        sliding_window_size=32, rel_extent=64)),
    # DeepSeek-V4 from legacy fields: default attention pattern, num_hash_layers, compress_rate_csa / _hca
    "deepseek_v4-legacy": ("deepseek_v4", ("layer_types", "mlp_layer_types", "compress_rates"), dict(
        num_hidden_layers=5, num_hash_layers=1, compress_rate_csa=8, compress_rate_hca=16, index_n_heads=4,
        index_head_dim=16)),
    "dots3-no-dsa": ("dots3_note_text", ("per_layer_config", "layer_types"), dict(use_dsa=False, use_sliding_window=False)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gap_family_variant_count_equals_transformers(name, tmp_path):
    mt, drop, extra = VARIANTS[name]
    cfg = {**_base(mt, drop), **extra}
    assert _count(tmp_path, cfg) == param_count(build(mt, cfg))


def test_mistral_large4_sharing_nope_and_shared_indexer_count_equals_transformers(tmp_path):
    """Mistral-Large-4 paths the census configs do not reach: KV-sharing layers (no kv_a), the
    default NoPE schedule (every 4th layer), "shared" indexer layers, the dense prefix from
    first_k_dense_replace, and a projector over two vision feature layers."""
    cfg = shrunk_config("mistral_large4")
    text = dict(cfg["text_config"])
    for k in ("no_rope_layers", "mlp_layer_types", "layer_types", "indexer_types"):
        text.pop(k, None)
    text.update(num_hidden_layers=5, kv_source_layers=[0, 0, 2, 2, 4], index_topk_pattern="FSFSS", first_k_dense_replace=2)
    cfg = {**cfg, "text_config": text, "vision_feature_layer": [-1, -2]}
    assert _count(tmp_path, cfg) == param_count(build("mistral_large4", cfg))


def test_deepseek_v4_header_count_with_topk_routers_and_compressors(tmp_path):
    """DeepSeek-V4 checkpoint (original tensor names after save_pretrained) with a hash layer, top-k
    routed layers (their correction bias is stored as `ffn.gate.bias`: a buffer, not counted), and
    one attention layer of each kind: header count == transformers' and == the config count."""
    import os
    import subprocess
    import sys

    cfg = {**shrunk_config("deepseek_v4"), "num_hidden_layers": 3, "mlp_layer_types": ["hash_moe", "moe", "moe"],
           "layer_types": ["compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"],
           "index_n_heads": 4, "index_head_dim": 16}
    model = build("deepseek_v4", cfg, device="cpu")
    model.save_pretrained(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-m", "moetool", "count", str(tmp_path), "--json"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    only = tmp_path / "only"
    only.mkdir()
    assert r["total_params"] == param_count(model) == _count(only, cfg)
    assert any(n.endswith("ffn.gate.bias") for n in _stored_names(tmp_path))  # the buffer is there, and not counted
    assert r["cross_check"]["match"], r["cross_check"]["differences"]
    assert "other" not in r["breakdown"]


def _stored_names(d: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "np") as fh:
            names += list(fh.keys())
    return names
