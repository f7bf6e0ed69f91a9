"""Sphinx configuration of pfunc's documentation site.

Build it as CI does (tests/docs/test_site.py), warnings as errors and every reference checked:

    python -m sphinx -b html -W --keep-going -n docs docs/_build/html
"""

import pfunc

project = "pfunc"
author = "the pfunc developers"
copyright = "2026, the pfunc developers"
release = pfunc.__version__
version = release

extensions = [
    "myst_parser",            # the guides are Markdown, like the README they grew from
    "sphinx.ext.autodoc",     # the API reference, from the docstrings
    "sphinx.ext.napoleon",    # their "Args:", "Returns:", "Attributes:" sections (Google style)
    "sphinx.ext.viewcode",    # each documented object links to its source
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
root_doc = "index"

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3      # "[how a call runs](guides/calls-and-state.md#how-a-call-runs)" links resolve

autodoc_default_options = {"members": True, "member-order": "bysource"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autoclass_content = "both"     # a class's docstring and its __init__'s
python_use_unqualified_type_names = True

# Every reference is checked (-n): a pfunc name that does not resolve fails the build. Names of
# other projects (torch, optree, Hypothesis, the standard library) cannot be resolved without
# their inventories, which need the network, so those are exempt, and nothing else.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|optree|hypothesis|typing|collections|contextlib|threading|numbers|types|abc|enum|datetime|pathlib|os|re)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|Generator|PyTree|Callable|Sequence|Mapping|Iterable|Iterator|Any|Optional|Union|Literal|TypeVar|ParamSpec|Self|NamedTuple|SearchStrategy|TensorLike|nn\..*|np\..*|dtype|device|Size|Work|ProcessGroup|DTensor)"),
    (r"py:class", r"(int|float|str|bool|bytes|tuple|list|dict|set|frozenset|object|type|None|NoneType|Exception|ValueError|TypeError|RuntimeError|AssertionError|KeyError)"),
    (r"py:.*", r"(function|method|builtins\..*|ellipsis|Ellipsis|P\..*|T|R|_.*)"),
]

# Private helper types that public signatures show (the shadow pool a Parametrized may share, the
# distributed package's internal aliases): named in the signature, deliberately not documented.
nitpick_ignore = [
    ("py:class", "pfunc.execution.ShadowPool"),
    ("py:class", "pfunc.distributed.process_group.Group"),
    ("py:class", "pfunc.distributed.trees.Leaves"),
    ("py:class", "pfunc.distributed.buckets.Bucket"),
    # the testing kit's strategies' type aliases, shown by name in their signatures
    ("py:class", "Drawable"),
    ("py:class", "ShapeLike"),
    ("py:class", "DTypeLike"),
    ("py:class", "DeviceLike"),
    # autodoc splits a dataclass field's stringified "dict[str, int]" at its comma (CheckReport)
    ("py:class", "dict[str"),
]

html_theme = "furo"
html_title = f"pfunc {release}"
html_static_path = []
