"""The data sources (`config.data.source`): every registered source is a whole `Source`, and
an unknown name is refused in one line naming the valid ones."""

import inspect

import pytest

from tests.conftest import load_config
from zf_tf.pipelines import inputs, sources


def test_every_registered_source_implements_the_protocol():
    methods = [name for name, _ in inspect.getmembers(sources.Source, inspect.isfunction)]
    assert {"records", "num_examples", "class_names", "splits", "check_split"} <= set(methods)
    assert inputs.SOURCES == ("embedded", "tfds", "folder", "prepared")
    for name, source in inputs.REGISTRY.items():
        assert isinstance(source, sources.Source), name
        assert not inspect.isabstract(type(source)), (name, type(source).__abstractmethods__)
        for method in methods:
            assert callable(getattr(source, method)), (name, method)
            ours = inspect.signature(getattr(sources.Source, method))
            theirs = inspect.signature(getattr(type(source), method))
            assert list(theirs.parameters) == list(ours.parameters), (name, method)


def test_unknown_source_is_one_line_naming_the_choices():
    data = load_config().data
    data.source = "web"
    message = "data.source must be one of embedded, tfds, folder, prepared; got 'web'"
    for call in (
        lambda: inputs.source(data),
        lambda: inputs.encoded_records(data, "train"),
        lambda: inputs.num_examples(data, "train"),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message
