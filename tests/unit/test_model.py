"""Stage1Model: shapes, gradients, masking invariance, input validation, precision and compile."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from stage1 import ConfigError, load_config
from stage1.losses import Stage1CombinedLoss
from stage1.model import Stage1Model, TFDecoder, TFSpecificStem, compute_latent_len
from stage1.model.bottleneck import Bottleneck
from stage1.model.stem import apply_stems

TIMEFRAMES = ["m1", "m5", "m15", "m30", "h1", "h4"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(n_tf: int = 6, seq_len: int = 16, **extra: object):
    """configs/test.yaml shrunk further (d_model 32, one layer) so shape sweeps stay fast."""
    overrides = [
        f"data.timeframes=[{','.join(TIMEFRAMES[:n_tf])}]",
        f"data.seq_len={seq_len}",
        "model.d_model=32",
        "model.encoder.n_heads=2",
        "model.encoder.n_layers=1",
    ]
    overrides += [f"{key}={value}" for key, value in extra.items()]
    return load_config("configs/test.yaml", overrides)


def random_batch(
    batch: int, n_tf: int, seq_len: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[B, n_tf, L, 6]`` and masks hiding ~30 % of bars in every timeframe."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_tf, seq_len, 6, generator=gen)
    masks = torch.rand(batch, n_tf, seq_len, generator=gen) < 0.3
    masks[:, :, 1] = True  # every timeframe has at least one hidden bar
    masks[:, 0, 0] = False  # the reference bar is never hidden (MaskingStrategy's rule)
    return x, masks


@pytest.mark.parametrize(
    ("seq_len", "stride", "expected"),
    [(48, 4, 12), (50, 4, 13), (64, 4, 16), (16, 4, 4), (7, 1, 7)],
)
def test_latent_len_is_ceil_of_seq_len_over_stride(
    seq_len: int, stride: int, expected: int
) -> None:
    assert compute_latent_len(seq_len, stride) == expected


@pytest.mark.parametrize(("seq_len", "stride"), [(0, 4), (48, 0)])
def test_latent_len_rejects_non_positive_sizes(seq_len: int, stride: int) -> None:
    with pytest.raises(ValueError, match="must both be >= 1"):
        compute_latent_len(seq_len, stride)


@pytest.mark.parametrize("seq_len", [48, 50, 64])
@pytest.mark.parametrize("n_tf", [1, 2, 3, 4, 5, 6])
def test_output_shapes(seq_len: int, n_tf: int) -> None:
    model = Stage1Model(tiny_config(n_tf, seq_len)).eval()
    x, masks = random_batch(2, n_tf, seq_len)
    out = model(x, masks)
    latent_len = math.ceil(seq_len / 4)
    assert model.latent_len == latent_len
    assert out["reconstructed"].shape == (2, n_tf, seq_len, 6)
    assert out["encoded"].shape == (2, n_tf, latent_len, 32)


@pytest.mark.parametrize("stride", [1, 2, 3, 4, 5])
def test_decoder_returns_exactly_seq_len_steps_from_each_latent_step(stride: int) -> None:
    """The transposed conv undoes the bottleneck's left padding: output bar t depends only on
    the latent step that encoded it (step (t + pad) // stride), never on a neighbour."""
    for seq_len in range(4, 30):
        latent_len = compute_latent_len(seq_len, stride)
        pad = latent_len * stride - seq_len
        upsample = TFDecoder(8, seq_len, latent_len, stride, ff_mult=2, dropout=0.0).upsample
        with torch.no_grad():
            base = upsample(torch.zeros(1, 8, latent_len))
            assert base.shape[-1] == seq_len
            for step in range(latent_len):
                latent = torch.zeros(1, 8, latent_len)
                latent[..., step] = 1.0
                touched = (upsample(latent) - base).abs().sum((0, 1)).nonzero().flatten()
                expected = [t for t in range(seq_len) if (t + pad) // stride == step]
                assert touched.tolist() == expected, (seq_len, stride, step)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_stems_compute_depthwise_then_pointwise(kernel_size: int) -> None:
    """The fused kernel is an optimisation only: each timeframe's output equals its own
    depth-wise conv followed by its point-wise projection, run as separate layers."""
    torch.manual_seed(0)
    stems = [TFSpecificStem(16, kernel_size) for _ in range(3)]
    x = torch.randn(4, 3, 11, 6)
    with torch.no_grad():
        fused = apply_stems(stems, x)
        for k, stem in enumerate(stems):
            filtered = stem.depthwise(x[:, k].transpose(1, 2)).transpose(1, 2)
            expected = stem.pointwise(filtered)
            torch.testing.assert_close(fused[:, k], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(stem(x[:, k]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_len", [12, 13, 15, 16])
def test_bottleneck_is_a_left_padded_strided_convolution(seq_len: int) -> None:
    torch.manual_seed(0)
    bottleneck = Bottleneck(8, seq_len, stride=4)
    x = torch.randn(2, 3, seq_len, 8)
    series = x.reshape(6, seq_len, 8).transpose(1, 2)
    with torch.no_grad():
        latent = bottleneck.conv(F.pad(series, (bottleneck.left_pad, 0))).transpose(1, 2)
        expected = bottleneck.norm(latent).view(2, 3, bottleneck.latent_len, 8)
        torch.testing.assert_close(bottleneck(x), expected, rtol=1e-5, atol=1e-5)


def test_encode_is_the_encoder_half_of_forward() -> None:
    model = Stage1Model(tiny_config(6, 16)).eval()
    x, masks = random_batch(3, 6, 16)
    with torch.no_grad():
        for m in (masks, None):
            torch.testing.assert_close(model.encode(x, m), model(x, m)["encoded"], rtol=0, atol=0)


MODEL_VARIANTS = [
    {"model.prior": "bridge", "model.window_scale": True},
    {"model.prior": "bridge", "model.window_scale": False},
    {"model.prior": "none", "model.window_scale": True},
    {"model.prior": "none", "model.window_scale": False},
]


def with_normalizer(model: Stage1Model, seed: int = 5) -> Stage1Model:
    """Non-trivial normaliser statistics (the prior and the window scale work in raw space)."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(model.n_tf, 6, generator=gen) * 1e-3
    std = torch.rand(model.n_tf, 6, generator=gen) * 1e-3 + 1e-4
    model.set_normalizer(mean, std)
    return model


@pytest.mark.parametrize("variant", MODEL_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_every_parameter_receives_a_finite_gradient(variant: dict[str, object]) -> None:
    config = load_config("configs/test.yaml", [f"{k}={v}" for k, v in variant.items()])
    model = with_normalizer(Stage1Model(config))
    for decoder in model.decoders:
        # The bridge prior starts its heads at zero (the model IS the bridge before training),
        # which stops every gradient behind them at step 0: give them weights for this check.
        torch.nn.init.normal_(decoder.head.weight, std=0.02)
    x, masks = random_batch(3, 6, config.data.seq_len)
    out = model(x, masks)
    assert torch.isfinite(out["reconstructed"]).all() and torch.isfinite(out["encoded"]).all()
    loss = Stage1CombinedLoss(config)(out["reconstructed"], x, masks, None, out.get("scale"))
    loss = loss["total"]
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached: {missing}"
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"gradient of {name} is identically zero"


def test_outputs_stay_finite_for_extreme_inputs() -> None:
    config = tiny_config(6, 48)
    model = Stage1Model(config).eval()
    x, masks = random_batch(2, 6, 48)
    for scale in (0.0, 1e-6, 1e3):
        out = model(x * scale, masks)
        assert torch.isfinite(out["reconstructed"]).all() and torch.isfinite(out["encoded"]).all()


@pytest.mark.parametrize("variant", MODEL_VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_hidden_input_values_do_not_change_the_output(variant: dict[str, object]) -> None:
    """Every model input (fill, window scale, centre, hidden flag, log scale) is hidden-blind."""
    config = tiny_config(6, 48, **variant)
    model = with_normalizer(Stage1Model(config)).eval()
    for decoder in model.decoders:
        torch.nn.init.normal_(decoder.head.weight, std=0.02)
    x, masks = random_batch(2, 6, 48)
    tampered = x.clone()
    tampered[masks] = torch.randn(int(masks.sum()), 6) * 100.0
    with torch.no_grad():
        reference = model(x, masks)
        changed = model(tampered, masks)
    for key in ("reconstructed", "encoded"):
        torch.testing.assert_close(changed[key], reference[key], rtol=0, atol=0)
    # ...whereas changing one visible bar does change it (the check above can fail).
    visible = (~masks[0, 2]).nonzero()[0, 0]
    tampered[0, 2, visible] += 1.0
    with torch.no_grad():
        assert not torch.equal(model(tampered, masks)["reconstructed"], reference["reconstructed"])


def test_masks_are_optional() -> None:
    """The guide's debugging example calls ``model(dummy_input)`` without masks."""
    model = Stage1Model(tiny_config(6, 50)).eval()
    out = model(torch.randn(2, 6, 50, 6))
    assert out["reconstructed"].shape == (2, 6, 50, 6)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((0, 6, 16, 6), "empty batch"),
        ((2, 6, 0, 6), r"expected x of shape \[B, 6, 16, 6\]"),
        ((2, 5, 16, 6), r"expected x of shape \[B, 6, 16, 6\]"),
        ((2, 6, 17, 6), r"expected x of shape \[B, 6, 16, 6\]"),
        ((2, 6, 16, 5), r"expected x of shape \[B, 6, 16, 6\]"),
        ((6, 16, 6), r"expected x of shape \[B, 6, 16, 6\]"),
    ],
)
def test_bad_input_shapes_raise_value_error(shape: tuple[int, ...], match: str) -> None:
    model = Stage1Model(tiny_config(6, 16))
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


def test_masks_must_be_bool_and_match_the_input() -> None:
    model = Stage1Model(tiny_config(6, 16))
    x, masks = random_batch(2, 6, 16)
    with pytest.raises(ValueError, match="masks must be bool"):
        model(x, masks.float())
    with pytest.raises(ValueError, match="masks must be bool"):
        model(x, masks[:, :3])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.stem.kernel_size=4", "model.stem.kernel_size: must be odd"),
        ("model.bottleneck.stride=0", "model.bottleneck.stride: must be >= 1"),
    ],
)
def test_bad_model_sizes_raise_config_error_naming_the_key(override: str, match: str) -> None:
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=match):
        Stage1Model(tiny_config(2, 16, **{key: value}))


def test_batch_of_one_matches_its_row_in_a_larger_batch() -> None:
    model = Stage1Model(tiny_config(6, 48)).eval()
    x, masks = random_batch(3, 6, 48)
    with torch.no_grad():
        full = model(x, masks)
        single = model(x[1:2], masks[1:2])
    assert single["reconstructed"].shape == (1, 6, 48, 6)
    torch.testing.assert_close(single["reconstructed"], full["reconstructed"][1:2])
    torch.testing.assert_close(single["encoded"], full["encoded"][1:2])


def test_math_attention_path_matches_default_path() -> None:
    torch.manual_seed(0)
    fast = Stage1Model(tiny_config(6, 16)).eval()
    math_path = Stage1Model(tiny_config(6, 16, **{"model.encoder.flash_attn": "false"})).eval()
    math_path.load_state_dict(fast.state_dict())
    x, masks = random_batch(2, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            math_path(x, masks)["reconstructed"], fast(x, masks)["reconstructed"]
        )


def test_parameter_counts_fit_the_shipped_configs() -> None:
    def n_params(name: str) -> int:
        return sum(p.numel() for p in Stage1Model(load_config(f"configs/{name}.yaml")).parameters())

    assert 100_000 <= n_params("test") <= 500_000
    assert 1_000_000 <= n_params("base") <= 10_000_000


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_forward_backward(dtype: torch.dtype) -> None:
    config = load_config("configs/test.yaml")
    model, criterion = Stage1Model(config), Stage1CombinedLoss(config)
    x, masks = random_batch(4, 6, config.data.seq_len)
    head_dtypes: list[torch.dtype] = []
    model.decoders[0].head.register_forward_hook(lambda m, i, o: head_dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, masks)
        losses = criterion(out["reconstructed"], x, masks, None, out.get("scale"))
    assert head_dtypes == [dtype]  # autocast really ran the network in low precision...
    # ...while the prior + correction is added in fp32: a pip is 1e-6 of the price
    assert out["reconstructed"].dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in losses.values())
    losses["total"].backward()
    assert torch.isfinite(losses["total"])
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.slow
def test_torch_compile_forward_backward_matches_eager() -> None:
    """Inductor on CPU; about 1-2 minutes cold on 2 cores (C++ kernels are compiled)."""
    torch.manual_seed(0)
    config = tiny_config(2, 16)
    eager = Stage1Model(config)
    compiled_model = Stage1Model(config)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model)
    x, masks = random_batch(2, 2, 16)
    out_eager, out_compiled = eager(x, masks), compiled(x, masks)
    torch.testing.assert_close(
        out_compiled["reconstructed"], out_eager["reconstructed"], rtol=1e-4, atol=1e-4
    )
    out_eager["reconstructed"].square().mean().backward()
    out_compiled["reconstructed"].square().mean().backward()
    for (name, p_eager), p_compiled in zip(
        eager.named_parameters(), compiled_model.parameters(), strict=True
    ):
        assert p_compiled.grad is not None, name
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-3, atol=1e-5, msg=name)


def aligned_times(
    batch: int, n_tf: int, seq_len: int, anchor: str = "2019-03-06 13:07"
) -> torch.Tensor:
    """Open times ``[B, n_tf, L]`` (int64 ns) of the bars complete at ``anchor`` (+1 min per row),
    each timeframe's newest bar the last one closed by then."""
    minutes = [1, 5, 15, 30, 60, 240][:n_tf]
    base = int(pd.Timestamp(anchor, tz="UTC").value)
    rows = []
    for b in range(batch):
        anchor_ns = base + b * 60_000_000_000
        per_tf = []
        for m in minutes:
            step = m * 60_000_000_000
            newest_open = (anchor_ns // step) * step - step
            per_tf.append([newest_open - (seq_len - 1 - i) * step for i in range(seq_len)])
        rows.append(per_tf)
    return torch.tensor(rows, dtype=torch.int64)


def test_time_features_are_the_calendar_of_each_bar_and_hidden_blind() -> None:
    config = tiny_config(6, 16, **{"model.time_features": True, "model.prior": "agg"})
    model = with_normalizer(Stage1Model(config)).eval()
    for decoder in model.decoders:
        torch.nn.init.normal_(decoder.head.weight, std=0.02)
    x, masks = random_batch(2, 6, 16)
    times = aligned_times(2, 6, 16)
    channels = model._time_channels(times)
    # Window 0, m1 newest bar opens Wednesday 2019-03-06 13:06 UTC.
    day = 2 * math.pi * (13 * 60 + 6) / 1440
    week = 2 * math.pi * (2 * 1440 + 13 * 60 + 6) / (7 * 1440)
    expected = torch.tensor([math.sin(day), math.cos(day), math.sin(week), math.cos(week), 0.0])
    torch.testing.assert_close(channels[0, 0, -1], expected, rtol=0, atol=1e-5)
    # Age in window lengths: the oldest m1 bar closed 15 minutes before the anchor.
    assert channels[0, 0, 0, 4].item() == pytest.approx(15 / 16)
    # h4 newest bar 08:00-12:00 closed 67 minutes before the 13:07 anchor.
    assert channels[0, 5, -1, 4].item() == pytest.approx(67 / (240 * 16))
    tampered = x.clone()
    tampered[masks] = torch.randn(int(masks.sum()), 6) * 100.0
    with torch.no_grad():
        reference = model(x, masks, times)
        changed = model(tampered, masks, times)
        for key in ("reconstructed", "encoded"):
            torch.testing.assert_close(changed[key], reference[key], rtol=0, atol=0)
        # ...and the calendar does reach the model (the check above can fail).
        shifted = model(x, masks, times + 3 * 3_600_000_000_000)
        assert not torch.equal(shifted["encoded"], reference["encoded"])


def test_time_features_need_times() -> None:
    model = Stage1Model(tiny_config(6, 16, **{"model.time_features": True})).eval()
    x, masks = random_batch(1, 6, 16)
    with pytest.raises(ValueError, match="time_features=true and needs times"):
        model(x, masks)


@pytest.mark.parametrize("prior", ["agg", "none"])
def test_forward_compiles_as_one_graph(prior: str) -> None:
    """No graph break in the forward that `training.compile` compiles (dynamo tracing only,
    no Inductor: seconds on CPU). Times are passed, as training passes them."""
    config = tiny_config(6, 16, **{"model.prior": prior})
    model = Stage1Model(config)
    x, masks = random_batch(2, 6, 16)
    minutes = torch.tensor([1, 5, 15, 30, 60, 240])[:, None] * torch.arange(16)
    times = (minutes * 60_000_000_000).expand(2, 6, 16).contiguous()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x, masks, times)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
