"""Channel pruning on the ONNX graph (He et al. 2017, "Channel Pruning for Accelerating Very Deep Neural
Networks"; PocketFlow's channel-pruned learner), with the channels followed through the graph.

Analysis (`ChannelGraph`): every Conv (group 1) and every Gemm / MatMul with a constant weight *produces*
channels; each channel is an atom. Atoms flow forward through the ops that keep channels apart:
BatchNormalization, elementwise activations, pooling, Resize, depthwise convs, Concat (offsets), Split (pieces),
Flatten / a flattening Reshape into a Gemm (blocks of H·W features), elementwise ops with per-channel constants.
An elementwise op joining two channel tensors (a residual Add, SiLU's Mul of x and Sigmoid(x)) ties its
operands' atoms channel by channel (union-find), so the layers feeding one Add are pruned as one *group* with one
channel set. The layers that reduce over channels (Conv, Gemm, MatMul) *consume* them: their input weights are
sliced. Anything else an atom reaches (a graph output, a channel-mixing Reshape or Transpose, a Slice, a Gather,
a softmax, a grouped conv, an op not listed here) pins it: that group is not pruned, and the report says why.

Selection per group, keeping round(keep × channels) (at least 1):
- without calibration: by magnitude, the L1 norm of each channel's filters summed over the group's producers;
- with calibration (He et al.'s reconstruction, greedy instead of LASSO): the channel set whose removal adds
  least to the consumers' output error ‖Σ_removed X_c W_cᵀ‖² on the calibration inputs, chosen greedily from
  the Gram matrix of each consumer's input (im2col patches for a conv); then each consumer's weights and bias are
  refit by least squares on the kept inputs (ridge 1e-6 of the Gram's trace). The Grams are of the input
  model's activations, collected in one pass (not layer by layer on the pruned model as the paper does).

Modules: channels (the analysis), ranking (which channels), budget (how many per group), rewrite (the new graph).
"""
