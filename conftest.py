"""Names every docstring example may use without importing them."""

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    import dmoe_edu.data as data
    import dmoe_edu.dmoe as dmoe
    import dmoe_edu.train as train

    doctest_namespace.update(
        np=np, torch=torch, DeepMoE=dmoe.DeepMoE, LayerSpec=dmoe.LayerSpec,
        TrainConfig=train.TrainConfig, train=train.train,
        **{name: getattr(data, name) for name in data.__all__},
    )
