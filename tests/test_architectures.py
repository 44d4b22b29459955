"""Issue 4, real architectures: Hugging Face Mistral, Mixtral (MoE), OPT (its MLP site on flattened tokens),
RoBERTa (post-norm), T5 (encoder-decoder with cross-attention) and a torchvision-style ResNet-18 (convolutional
blocks, channel-first stream), all from small random configs (no downloads).

For each: exactly the expected residual sites are rewritten (site paths asserted, every other add left in
place), the function is preserved at init (eval, fp32, relative error <= 1e-5 on fresh random inputs), and a
training step gives every mHC parameter a finite gradient. What cannot be converted (ResNet's projection
shortcuts) is named in a warning, and raises under ``strict=True``.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import mhc_compile  # noqa: F401  (the backend is also reachable by its entry point)
from mhc_compile.backend import REPORTS
from models import output_tensor, rel_err

import transformers  # noqa: E402  (a test dependency: fail, never skip, without it)

OPTIONS = {"n": 4, "inner_backend": "aot_eager"}


# --- ResNet-18, written as torchvision writes it (out += identity, ReLU(inplace=True)) -------------------


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision.models.resnet18 with a configurable base width (64 there, 8 here)."""

    def __init__(self, width=8, num_classes=10):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, 2)
        self.layer2 = self._make_layer(width * 2, 2, stride=2)
        self.layer3 = self._make_layer(width * 4, 2, stride=2)
        self.layer4 = self._make_layer(width * 8, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8, num_classes)
        for m in self.modules():  # BN that is not the identity at init, so the test sees it
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- the models ---------------------------------------------------------------------------------------------

SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50)


def _ids(*shape):
    return torch.randint(0, 50, shape)


def _build(name):
    """(model, a function returning fresh inputs as kwargs)"""
    if name == "mistral":
        cfg = transformers.MistralConfig(num_hidden_layers=2, num_key_value_heads=1, sliding_window=4, **SMALL)
        return transformers.MistralForCausalLM(cfg), lambda: {"input_ids": _ids(2, 8)}
    if name == "mixtral":
        cfg = transformers.MixtralConfig(num_hidden_layers=2, num_key_value_heads=1, num_local_experts=4,
                                         num_experts_per_tok=2, **SMALL)
        return transformers.MixtralForCausalLM(cfg), lambda: {"input_ids": _ids(2, 8)}
    if name == "opt":
        cfg = transformers.OPTConfig(hidden_size=32, num_attention_heads=2, ffn_dim=64, vocab_size=50,
                                     num_hidden_layers=2, word_embed_proj_dim=32)
        return transformers.OPTForCausalLM(cfg), lambda: {"input_ids": _ids(2, 8)}
    if name == "roberta":
        cfg = transformers.RobertaConfig(num_hidden_layers=2, max_position_embeddings=20, **SMALL)
        return transformers.RobertaModel(cfg, add_pooling_layer=False), lambda: {"input_ids": _ids(2, 8)}
    if name == "t5":
        cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                    num_decoder_layers=2, num_heads=2)
        return (transformers.T5ForConditionalGeneration(cfg),
                lambda: {"input_ids": _ids(2, 8), "decoder_input_ids": _ids(2, 6)})
    if name == "resnet18":
        return ResNet18(), lambda: {"x": torch.randn(2, 3, 32, 32)}
    raise KeyError(name)


def _layers(patterns, n):
    return [p.format(i=i) for i in range(n) for p in patterns]


T5_ENC = ["encoder.block.{i}.layer.0.mhc_SelfAttention", "encoder.block.{i}.layer.1.mhc_DenseReluDense"]
T5_DEC = ["decoder.block.{i}.layer.0.mhc_SelfAttention", "decoder.block.{i}.layer.1.mhc_EncDecAttention",
          "decoder.block.{i}.layer.2.mhc_DenseReluDense"]
RESNET_CHAINS = [["layer1.0.mhc_conv1_conv2", "layer1.1.mhc_conv1_conv2"], ["layer2.1.mhc_conv1_conv2"],
                 ["layer3.1.mhc_conv1_conv2"], ["layer4.1.mhc_conv1_conv2"]]

# name -> (chains as lists of site paths, site kind, channel width C, modules named as not converted)
EXPECTED = {
    "mistral": ([_layers(["model.layers.{i}.mhc_self_attn", "model.layers.{i}.mhc_mlp"], 2)], "pre-norm", 32, []),
    # the MoE block (router + experts) is the branch of the second site
    "mixtral": ([_layers(["model.layers.{i}.mhc_self_attn", "model.layers.{i}.mhc_mlp"], 2)], "pre-norm", 32, []),
    # its MLP site runs on [B*T, C], between a reshape and a view back: both regroup the n-stream's tokens, one chain
    "opt": ([_layers(["model.decoder.layers.{i}.mhc_self_attn", "model.decoder.layers.{i}.mhc_fc1"], 2)], "pre-norm", 32,
            []),
    "roberta": ([_layers(["encoder.layer.{i}.attention.output.mhc_dense", "encoder.layer.{i}.output.mhc_dense"], 2)],
                "post-norm", 32, []),
    # two chains: the encoder's (2 sites a layer) and the decoder's (3 a layer); the decoder's cross-attention
    # reads the encoder chain's collapsed tail
    "t5": ([_layers(T5_ENC, 2), _layers(T5_DEC, 2)], "pre-norm", 32, []),
    # identity blocks convert; the three downsampling blocks (projection shortcut) end a chain and are named
    "resnet18": (RESNET_CHAINS, "plain", None, ["layer2.0", "layer3.0", "layer4.0"]),
}
RESNET_WIDTH = {"layer1": 8, "layer2": 16, "layer3": 32, "layer4": 64}


_IADD = re.compile(r'^\s*\w+ \+= \w+;\s*(\w+)(?:: "[^"]*")? = ')
_ASSIGN = re.compile(r'^\s*(\w+)(?:: "[^"]*")? = (.*?)(?:;.*)?$')


def _adds_in(text):
    """Names of the add nodes in a printed graph (``a + b``, ``a += b``, ``operator.iadd``, ``torch.add``)."""
    names = set()
    for line in text.splitlines():
        if m := _IADD.match(line):  # printed as "a += b;  out: "f32[...]" = a"
            names.add(m.group(1))
            continue
        m = _ASSIGN.match(line)
        if m and re.search(r"^[\w.]+ \+=? [\w.-]+$|\biadd\(|\btorch\.add\(|\.add\(", m.group(2)):
            names.add(m.group(1))
    return names


def _compiled_report(start):
    reports = [r for r in REPORTS[start:] if r.sites]
    assert len(reports) == 1, "one graph expected (no graph breaks)"
    return reports[0]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_converts_expected_sites_and_preserves_function(name):
    torch.manual_seed(0)
    model, inputs = _build(name)
    model.eval()
    chains, kind, width, unconverted = EXPECTED[name]
    kw = inputs()
    with torch.no_grad():
        want = output_tensor(model(**kw))
    start = len(REPORTS)
    compiled = torch.compile(model, backend="mhc", options=OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = output_tensor(compiled(**kw))
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5

    # fresh random inputs through the same compiled model
    kw = inputs()
    with torch.no_grad():
        assert rel_err(output_tensor(compiled(**kw)), output_tensor(model(**kw))) <= 1e-5

    report = _compiled_report(start)
    det = report.detection
    assert [[s.path for s in c.sites] for c in det.chains] == chains
    assert {s.kind for s in det.sites} == {kind}
    for s in det.sites:
        assert s.width == (width or RESNET_WIDTH[s.path.split(".")[0]])
        assert s.channel_dim == (1 if name == "resnet18" else -1)

    # nothing but the residual adds was rewritten: every other add of the graph is still there
    site_adds = {a.name for s in det.sites for a in s.adds}
    before, after = _adds_in(report.before), _adds_in(report.gm.print_readable(print_output=False))
    assert site_adds <= before
    assert site_adds.isdisjoint(after)
    assert before - site_adds <= after

    # what is not converted is named, module by module, in a warning
    assert sorted(u.module for u in det.unconverted) == unconverted
    messages = [str(w.message) for w in caught if "not converted" in str(w.message)]
    assert len(messages) == len(unconverted)
    for module, msg in zip(unconverted, messages):
        assert f" in {module}: projection shortcut" in msg

    # parameters: one MHCSite per site on the owning module, phi [n C, n^2 + 2n]
    params = dict(model.named_parameters())
    for s in det.sites:
        assert params[f"{s.path}.phi"].shape == (4 * s.width, 24)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_training_step_gives_every_mhc_parameter_a_gradient(name, quiet):
    torch.manual_seed(0)
    model, inputs = _build(name)
    model.train()
    compiled = torch.compile(model, backend="mhc", options=OPTIONS)
    out = output_tensor(compiled(**inputs()))
    loss = out.float().square().mean()
    loss.backward()
    params = dict((k, p) for k, p in model.named_parameters() if ".mhc_" in k)
    chains = EXPECTED[name][0]
    assert len(params) == 3 * sum(map(len, chains))
    missing = [k for k, p in params.items() if p.grad is None]
    assert not missing, missing
    bad = [k for k, p in params.items() if not torch.isfinite(p.grad).all()]
    assert not bad, bad
    assert any(p.grad.abs().sum() > 0 for k, p in params.items() if k.endswith(".phi"))
    assert all(p.grad is not None for k, p in model.named_parameters() if ".mhc_" not in k and p.requires_grad
               and "pooler" not in k)


def test_resnet_projection_shortcut_is_an_error_under_strict():
    model = ResNet18().eval()
    with pytest.raises(Exception, match=r"not converted: \w+ in layer2\.0: projection shortcut.*strict=True"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.compile(model, backend="mhc", options={**OPTIONS, "strict": True})(torch.randn(1, 3, 32, 32))


def test_resnet_stream_is_widened_channel_last_and_relu_runs_per_stream(quiet):
    """The rewritten ResNet keeps the n streams as [B, H, W, n, C] between blocks; the post-add ReLU runs on
    them out of place, and the sublayer reads [B, C, H, W] again."""
    model = ResNet18().eval()
    start = len(REPORTS)
    torch.compile(model, backend="mhc", options=OPTIONS)(torch.randn(2, 3, 32, 32))
    report = _compiled_report(start)
    chain = report.detection.chains[0]
    link = chain.links[0]
    assert [n.target.__name__ for n in link] == ["relu"] and link[0].kwargs.get("inplace") is False
    post_res = [n for n in report.gm.graph.nodes if n.target is torch.ops.mhc_compile.post_res.default]
    assert len(post_res) == 5
    pre = [n for n in report.gm.graph.nodes if n.target is torch.ops.mhc_compile.pre.default]
    conv_inputs = [next(iter(n.users)) for n in pre]
    assert all(u.target == "movedim" and u.args[1:] == (-1, 1) for u in conv_inputs)


def test_prepare_takes_keyword_inputs_of_an_encoder_decoder(quiet):
    """T5 needs decoder_input_ids as a keyword: prepare() creates every site's parameters from them, and the
    first compile then finds them (nothing created lazily)."""
    model, make_inputs = _build("t5")
    inputs = make_inputs()
    mhc_compile.prepare(model, example_kwargs=inputs, n=4)
    want = [p for chain in EXPECTED["t5"][0] for p in chain]
    assert sorted(k.rsplit(".", 1)[0] for k, _ in model.named_parameters() if ".mhc_" in k and k.endswith(".phi")) == sorted(want)
    start = len(REPORTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a lazily created parameter would warn
        torch.compile(model, backend="mhc", options=OPTIONS)(**inputs)
    assert all(not r.created for r in REPORTS[start:])


# --- more decoder-only Hugging Face models: each converts as one chain and keeps its function at init -------------

_DEC = dict(SMALL, num_hidden_layers=2)
_GPT = dict(n_embd=32, n_head=2, n_layer=2, vocab_size=50)
# name -> (config, sites a layer: 2 for attention then MLP, 1 for a parallel block whose branch is attn + mlp)
MORE = {
    "qwen2": (lambda: transformers.Qwen2Config(num_key_value_heads=1, **_DEC), 2),
    "qwen3": (lambda: transformers.Qwen3Config(num_key_value_heads=1, head_dim=16, **_DEC), 2),
    "qwen3_moe": (lambda: transformers.Qwen3MoeConfig(num_key_value_heads=1, head_dim=16, num_experts=4,
                                                      num_experts_per_tok=2, moe_intermediate_size=32, **_DEC), 2),
    "gemma2": (lambda: transformers.Gemma2Config(num_key_value_heads=1, head_dim=16, **_DEC), 2),  # sandwich norms
    "gemma3_text": (lambda: transformers.Gemma3TextConfig(num_key_value_heads=1, head_dim=16, **_DEC), 2),
    "phi3": (lambda: transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, **_DEC), 2),
    "olmo2": (lambda: transformers.Olmo2Config(num_key_value_heads=2, **_DEC), 2),  # norms inside the branches
    "stablelm": (lambda: transformers.StableLmConfig(num_key_value_heads=2, **_DEC), 2),
    "starcoder2": (lambda: transformers.Starcoder2Config(num_key_value_heads=1, **_DEC), 2),
    "granite": (lambda: transformers.GraniteConfig(num_key_value_heads=1, residual_multiplier=0.5, **_DEC), 2),
    "nemotron": (lambda: transformers.NemotronConfig(num_key_value_heads=2, **_DEC), 2),
    "deepseek_v3": (lambda: transformers.DeepseekV3Config(
        num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=1, topk_group=1, **_DEC), 2),  # MLA attention; a dense, then an MoE layer
    "gpt_bigcode": (lambda: transformers.GPTBigCodeConfig(**_GPT), 2),
    "gpt_neo": (lambda: transformers.GPTNeoConfig(hidden_size=32, num_heads=2, num_layers=2, vocab_size=50,
                                                  attention_types=[[["global", "local"], 1]], window_size=4), 2),
    "bloom": (lambda: transformers.BloomConfig(hidden_size=32, n_head=2, n_layer=2, vocab_size=50), 2),
    "mpt": (lambda: transformers.MptConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=50), 2),
    "falcon": (lambda: transformers.FalconConfig(hidden_size=32, num_attention_heads=2, vocab_size=50,
                                                 num_hidden_layers=2, parallel_attn=True), 1),
    "gptj": (lambda: transformers.GPTJConfig(rotary_dim=8, **_GPT), 1),
    "codegen": (lambda: transformers.CodeGenConfig(rotary_dim=8, **_GPT), 1),
    "cohere": (lambda: transformers.CohereConfig(num_key_value_heads=2, **_DEC), 1),
    "phi": (lambda: transformers.PhiConfig(**_DEC), 1),
}


@pytest.mark.parametrize("name", list(MORE))
def test_more_decoders_convert_as_one_chain_and_keep_their_function(name, quiet):
    config, per_layer = MORE[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config()).eval()
    ids = {"input_ids": _ids(2, 8)}
    with torch.no_grad():
        want = output_tensor(model(**ids))
        start = len(REPORTS)
        got = output_tensor(torch.compile(model, backend="mhc", options=OPTIONS)(**ids))
    report = _compiled_report(start)
    assert [len(c.sites) for c in report.detection.chains] == [2 * per_layer]
    assert rel_err(got, want) <= 1e-5
