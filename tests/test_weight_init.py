import copy
import logging

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradmon import WeightInit
from gradmon.init import initialize


class TinyMLP(LightningModule):
    """Keeps a copy of its parameters as the first training step sees them."""

    def __init__(self, build_in_configure_model: bool = False) -> None:
        super().__init__()
        self.build_in_configure_model = build_in_configure_model
        self.net: nn.Module | None = None if build_in_configure_model else self.build()
        self.first_step_weights: dict[str, torch.Tensor] | None = None

    @staticmethod
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

    def configure_model(self) -> None:
        if self.net is None:
            self.net = self.build()

    def training_step(self, batch, batch_idx):
        if self.first_step_weights is None:
            self.first_step_weights = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator))
        return DataLoader(data, batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(tmp_path, model, callbacks, max_steps=2, **fit_kwargs) -> Trainer:
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, **fit_kwargs)
    return trainer


def assert_state_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_first_training_step_sees_the_initialised_weights(tmp_path):
    model = TinyMLP()
    expected = copy.deepcopy(model.net)
    initialize(expected, "normal", std=0.5, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(model.net[0].weight, expected[0].weight)
    callback = WeightInit("normal", std=0.5, seed=3)
    fit(tmp_path, model, [callback])
    assert_state_equal(model.first_step_weights, expected.state_dict())
    assert [record.layer for record in callback.records] == ["net.0", "net.2"]


def test_model_built_in_configure_model_is_initialised(tmp_path):
    model = TinyMLP(build_in_configure_model=True)
    fit(tmp_path, model, [WeightInit("constant(val=0.25)", bias=0.5)])
    for name, tensor in model.first_step_weights.items():
        assert torch.all(tensor == (0.25 if name.endswith("weight") else 0.5)), name


def test_resume_from_checkpoint_keeps_the_checkpoint_weights(tmp_path):
    first = TinyMLP()
    # Four steps are one whole epoch, so the resumed run starts a fresh one.
    trainer = fit(tmp_path, first, [WeightInit("kaiming_normal", seed=0)], max_steps=4)
    ckpt_path = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(ckpt_path)
    saved = torch.load(ckpt_path, weights_only=False)
    assert {"applied": True} in saved["callbacks"].values()

    resumed = TinyMLP()
    # The same callback finds its state restored; a new one (whose state is not in the checkpoint) must still
    # see that fit is resuming.
    same, new = WeightInit("kaiming_normal", seed=0), WeightInit("constant(val=9.0)")
    fit(tmp_path, resumed, [same, new], max_steps=6, ckpt_path=ckpt_path)
    expected = {k.removeprefix("net."): v for k, v in saved["state_dict"].items()}
    assert_state_equal(resumed.first_step_weights, expected)
    assert same.records == [] and new.records == []


def test_second_weight_init_overrides_the_first_on_its_layers(tmp_path):
    model = TinyMLP()
    callbacks = [WeightInit("constant(val=1.0)"), WeightInit("constant(val=2.0)", include=r"^net\.0$")]
    fit(tmp_path, model, callbacks)
    assert torch.all(model.first_step_weights["0.weight"] == 2.0)
    assert torch.all(model.first_step_weights["2.weight"] == 1.0)
    assert callbacks[0].state_key != callbacks[1].state_key


def test_verbose_false_prints_no_table_but_logs_and_records_it(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        callback = WeightInit("xavier_uniform", verbose=False)
        trainer = fit(tmp_path, TinyMLP(), [callback])
    assert "| net.0 |" not in caplog.text
    assert [r.name for r in callback.records] == ["net.0", "net.2"]
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    assert "weight_init/0_xavier_uniform/text_summary" in events.Tags()["tensors"]


def test_record_table_is_printed_and_readable_back_from_tensorboard(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        trainer = fit(tmp_path, TinyMLP(), [WeightInit("xavier_uniform"), WeightInit("normal(std=0.01)")])
    assert "| net.2 | normal(std=0.01) |" in caplog.text

    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    texts = {
        tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
        for tag in events.Tags()["tensors"]
        if tag.startswith("weight_init/")
    }
    assert sorted(texts) == ["weight_init/0_xavier_uniform/text_summary", "weight_init/1_normal/text_summary"]
    table = texts["weight_init/1_normal/text_summary"]
    assert table.splitlines()[0] == "| layer | scheme | weight std before | weight std after |"
    assert "| net.0 | normal(std=0.01) |" in table


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"scheme": "he_normal"}, "scheme='he_normal'"),
        ({"scheme": "kaiming_normal", "nonlinearity": "swish"}, "'kaiming_normal'.*nonlinearity='swish'"),
        ({"scheme": "normal", "sd": 0.1}, "sd=0.1.*'normal' accepts: mean, std"),
        ({"scheme": "normal(std=0.01"}, "literal keyword arguments"),
        ({"scheme": "zeros", "types": ["Dense"]}, "'Dense'"),
        ({"scheme": "zeros", "exclude": "[net"}, "exclude="),
        ({"scheme": "zeros", "bias": "none"}, "bias='none'"),
        ({"scheme": "zeros", "seed": -1}, "seed=-1"),
        ({"scheme": "zeros", "seed": 1.5}, "seed=1.5"),
        ({"scheme": "zeros", "types": "LSTMM"}, "types='LSTMM'.*LSTM, GRU"),
        ({"scheme": "zeros", "types": "ReLU"}, "types='ReLU'.*ReLU has no weights"),
        ({"scheme": "zeros", "types": ["Linear", "Sequential"]}, "Sequential has no weights"),
        ({"scheme": "zeros", "types": None}, "types=None"),
        ({"scheme": "zeros", "weights": "["}, r"weights='\['"),
        ({"scheme": "default", "weights": "weight_hh"}, "weights='weight_hh'.*'default'"),
        ({"scheme": "zeros", "bias": 1e39}, "bias=1e\\+39"),
        ({"scheme": "normal(std=1e39)"}, "std=1e\\+39"),
        ({"scheme": "normal", "mean": 1e39}, "mean=1e\\+39"),
        ({"scheme": "trunc_normal", "a": -1e39}, "a=-1e\\+39"),
        ({"scheme": "uniform", "b": 10**400}, "b=<an integer of about 400 digits>"),
        ({"scheme": "orthogonal(gain=1e39)"}, "gain=1e\\+39"),
        ({"scheme": "constant", "val": -3.5e38}, "val=-3.5e\\+38"),
    ],
)
def test_invalid_arguments_raise_at_construction(arguments, message):
    with pytest.raises(ValueError, match=message):
        WeightInit(**arguments)


def test_string_form_constructs_like_keywords():
    from_string = WeightInit("kaiming_normal(nonlinearity='relu', mode='fan_out')")
    from_keywords = WeightInit("kaiming_normal", nonlinearity="relu", mode="fan_out")
    assert from_string.arguments == {"nonlinearity": "relu", "mode": "fan_out"}
    assert from_string.state_key == from_keywords.state_key


def test_callback_yaml_entry_parses_like_lightning_cli():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.callbacks import Callback

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    config = parser.parse_string(
        """
        callbacks:
          - class_path: gradmon.WeightInit
            init_args:
              scheme: kaiming_normal(nonlinearity='relu')
              include: net\\.0
              types: [Linear, torch.nn.Embedding]
        """
    )
    (callback,) = parser.instantiate(config).callbacks
    assert isinstance(callback, WeightInit)
    assert (callback.scheme, callback.arguments) == ("kaiming_normal", {"nonlinearity": "relu"})
    assert callback.include.pattern == r"net\.0"
    assert callback.types == (nn.Linear, nn.Embedding)


def test_compiled_submodule_is_selected_and_recorded_by_the_users_names(tmp_path, caplog):
    model = TinyMLP()
    model.net = torch.compile(model.net, backend="eager")
    expected = copy.deepcopy(model.net._orig_mod)
    with torch.no_grad():
        expected[0].weight.fill_(0.5)
        expected[0].bias.zero_()
    callback = WeightInit("constant(val=0.5)", include=r"^net\.0$")
    with caplog.at_level(logging.INFO):
        fit(tmp_path, model, [callback], max_steps=1)
    assert [record.name for record in callback.records] == ["net.0"]
    assert "| net.0 | constant(val=0.5) |" in caplog.text
    assert_state_equal(model.first_step_weights, {f"_orig_mod.{k}": v for k, v in expected.state_dict().items()})


@pytest.mark.parametrize("seed", [2**64, 2**70, 10**400, -1, True, 1.0, "0"])
def test_seed_outside_64_bits_or_not_an_integer_is_refused_at_construction(seed):
    with pytest.raises(ValueError, match=r"`seed=.*expected an integer in \[0, 18446744073709551615\]"):
        WeightInit("normal", seed=seed)


def test_the_largest_seed_initialises(tmp_path):
    model = TinyMLP()
    expected = copy.deepcopy(model.net)
    initialize(expected, "normal", std=0.5, generator=torch.Generator().manual_seed(2**64 - 1))
    fit(tmp_path, model, [WeightInit("normal", std=0.5, seed=2**64 - 1)], max_steps=1)
    assert_state_equal(model.first_step_weights, expected.state_dict())


def test_same_instance_initialises_a_new_model_in_a_second_fit_and_keeps_weights_on_resume(tmp_path, caplog):
    callback = WeightInit("normal", std=0.5, seed=3)
    first = TinyMLP()
    trainer = fit(tmp_path, first, [callback], max_steps=4)
    ckpt_path = tmp_path / "first.ckpt"
    trainer.save_checkpoint(ckpt_path)

    # A fresh fit of a new model (a sweep, a notebook re-run): initialised with the seed's weights, nothing skipped.
    second = TinyMLP()
    expected = copy.deepcopy(second.net)
    initialize(expected, "normal", std=0.5, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.INFO):
        fit(tmp_path, second, [callback], max_steps=1)
    assert_state_equal(second.first_step_weights, expected.state_dict())
    assert [record.name for record in callback.records] == ["net.0", "net.2"]
    assert "skipped" not in caplog.text

    # A real resume with the same instance: the checkpoint's weights, and the message says they were restored.
    caplog.clear()
    resumed = TinyMLP()
    with caplog.at_level(logging.INFO):
        fit(tmp_path, resumed, [callback], max_steps=6, ckpt_path=ckpt_path)
    saved = torch.load(ckpt_path, weights_only=False)["state_dict"]
    assert_state_equal(resumed.first_step_weights, {k.removeprefix("net."): v for k, v in saved.items()})
    assert callback.records == []
    assert "skipped, weights restored" in caplog.text


class Recurrent(LightningModule):
    """An LSTM, self-attention over its outputs and a Linear head; keeps its weights as the first step sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 1)
        self.first_step_weights: dict[str, torch.Tensor] | None = None

    def training_step(self, batch, batch_idx):
        if self.first_step_weights is None:
            self.first_step_weights = {k: v.detach().clone() for k, v in self.state_dict().items()}
        x, y = batch
        hidden, _ = self.lstm(x.unsqueeze(0))
        attended, _ = self.attn(hidden, hidden, hidden)
        return nn.functional.mse_loss(self.head(attended[0]), y)

    def train_dataloader(self):
        return TinyMLP.train_dataloader(self)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lstm_and_attention_weights_are_initialised_and_each_gets_a_row(tmp_path, caplog):
    model = Recurrent()
    expected = copy.deepcopy(model)
    initialize(expected, "xavier_uniform", generator=torch.Generator().manual_seed(0))
    initialize(expected, "orthogonal", types="LSTM", weights="weight_hh", generator=torch.Generator().manual_seed(1))
    callbacks = [
        WeightInit("xavier_uniform", seed=0),
        WeightInit("orthogonal", types="LSTM", weights="weight_hh", seed=1),
    ]
    with caplog.at_level(logging.INFO):
        trainer = fit(tmp_path, model, callbacks, max_steps=1)
    assert_state_equal(model.first_step_weights, expected.state_dict())
    assert [record.name for record in callbacks[0].records] == [
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l1",
        "lstm.weight_hh_l1",
        "attn.in_proj_weight",
        "attn.out_proj",
        "head",
    ]
    assert [record.name for record in callbacks[1].records] == ["lstm.weight_hh_l0", "lstm.weight_hh_l1"]
    weight_hh = model.first_step_weights["lstm.weight_hh_l1"]
    torch.testing.assert_close(weight_hh.T @ weight_hh, torch.eye(8), atol=1e-5, rtol=0)
    assert "| lstm.weight_hh_l1 | orthogonal |" in caplog.text

    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    table = events.Tensors("weight_init/0_xavier_uniform/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| attn.in_proj_weight | xavier_uniform |" in table


class NoWeight(nn.Module):
    """A user's layer without a `weight`: accepted at construction, refused when fit starts."""

    def forward(self, x):
        return x


def test_user_layer_without_weight_is_accepted_then_named_at_fit_start(tmp_path):
    model = TinyMLP()
    model.extra = NoWeight()
    callback = WeightInit("normal", types=NoWeight)
    with pytest.raises(ValueError, match=r"'normal' cannot initialise 'extra' \(NoWeight\): it has no `weight`"):
        fit(tmp_path, model, [callback], max_steps=1)


def test_a_weight_norm_layer_trains_from_the_initialised_weights_and_the_records_say_so(tmp_path):
    from torch.nn.utils import parametrizations

    model = TinyMLP()
    parametrizations.weight_norm(model.net[0])  # its weight is now computed from g and v at each access
    callback = WeightInit("constant(val=0.25)", bias=0.5)
    fit(tmp_path, model, [callback])
    # What the first training step computed the layer's weight from: g and v as WeightInit left them.
    g = model.first_step_weights["0.parametrizations.weight.original0"]
    v = model.first_step_weights["0.parametrizations.weight.original1"]
    weight = torch._weight_norm(v, g, 0)
    torch.testing.assert_close(weight, torch.full((16, 4), 0.25))
    assert torch.all(model.first_step_weights["0.bias"] == 0.5)
    assert [(r.layer, r.std_after) for r in callback.records] == [("net.0", 0.0), ("net.2", 0.0)]
