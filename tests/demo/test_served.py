"""What `loraserve serve` serves: the demo and its adapters without a model, else what is given."""

from __future__ import annotations

from loraserve.app import served_model
from loraserve.config import EngineConfig, ServerConfig
from loraserve.demo import demo_model


def test_without_a_model_the_demo_and_its_adapters_are_served():
    demo = demo_model()
    served = served_model(ServerConfig(adapters=(("sql", "/adapters/sql"),)))
    assert served.model == str(demo.base)
    assert dict(served.shared_adapters) == {
        **{name: str(path) for name, path in demo.adapters.items()},
        "sql": "/adapters/sql",
    }


def test_an_adapter_given_by_name_replaces_the_built_in_one():
    served = served_model(ServerConfig(adapters=(("upper", "/adapters/mine"),)))
    assert dict(served.shared_adapters)["upper"] == "/adapters/mine"
    assert [name for name, _ in served.shared_adapters].count("upper") == 1


def test_with_a_model_only_what_is_given_is_served():
    config = ServerConfig(engine=EngineConfig(model="/models/llama"), adapters=(("a", "/a"),))
    served = served_model(config)
    assert served.model == "/models/llama"
    assert served.shared_adapters == (("a", "/a"),)
