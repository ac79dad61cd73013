"""Names every docstring example may use without importing them."""

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

# The notebooks' .py sources run a whole course chapter on import: nbval runs
# their executed .ipynb twins instead.
collect_ignore_glob = ["notebooks/*.py", "notebooks/**/*.py", "tools/*.py"]


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    import dmoe_edu.course as course
    import dmoe_edu.data as data
    import dmoe_edu.dmoe as dmoe
    import dmoe_edu.train as train

    doctest_namespace.update(
        np=np, torch=torch, course=course, go=go, DeepMoE=dmoe.DeepMoE,
        LayerSpec=dmoe.LayerSpec, TrainConfig=train.TrainConfig, train=train.train,
        **{name: getattr(data, name) for name in data.__all__},
    )
