"""dmoe_edu: learn Mixture-of-Experts by rebuilding the Deep Mixture of Experts.

The package rebuilds Eigen, Ranzato and Sutskever, *Learning Factored
Representations in a Deep Mixture of Experts* (arXiv:1312.4314), piece by piece.

Notation used in every module, docstring, shape comment and figure:

=====  ==========================================
``B``  batch size
``D``  input width of a layer
``H``  expert width (hidden units of one expert)
``E``  number of experts in a layer
``K``  number of selected experts (sparse gating)
``L``  layer index of the deep mixture
``C``  number of classes
=====  ==========================================
"""

__version__ = "0.1.0"
