"""The graph layer: reading and writing models (io), constant weights (constants), shapes with the sizes a
user gives (shapes), node helpers (nodes), layer selection by name and module path (selection), what a rule may
ask about a graph (context), the com.onnxopt op schemas (schemas), and params/FLOPs (flops). No rewriting here.
"""
