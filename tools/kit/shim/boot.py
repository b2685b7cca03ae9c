"""Launcher that runs one of the UNMODIFIED AutoDL starting-kit programs
(ingestion.py or score.py) under a modern Python 3.11 / TensorFlow 2.x stack.

Usage (normally called by tools/kit/run.py, not by hand):

    python boot.py SCRIPT [SCRIPT_ARGS...]

Behaviour is configured through environment variables:

  KIT_SHIM_TF_MODE      'graph' (default, = TF 1.x semantics of the official
                        challenge: tf.compat.v1 + disable_v2_behavior) or
                        'eager' (TF2 eager execution; `tf.X` resolves to the
                        TF2 symbol and falls back to tf.compat.v1.X).
  KIT_SHIM_CLIENT_DIRS  os.pathsep-separated directories whose modules get the
                        TF1-compatible `tensorflow` module when they execute
                        `import tensorflow` (the kit export and the code dir).

Nothing here edits the kit.  Every fix is applied from the outside, before the
kit's script starts, and only in this process:

  1. `import tensorflow` inside the client dirs returns an alias module
     (see _TFAlias) instead of the TF2 top-level module.
  2. `tf.estimator` (removed from TF >= 2.16) is provided by tf1_estimator.py
     in graph mode.
  3. `pip._internal.utils.misc.get_installed_distributions` (removed in
     pip 21.3, imported by the kit's data_io.py and libscores.py) is restored.
  4. The kit's protoc-3.x generated `data_pb2.py` cannot be executed by
     protobuf >= 4 ("Descriptors cannot be created directly"); if that happens
     the module is rebuilt from the serialized descriptor contained in that
     very file (no copy of kit code is made).
  5. triton (pulled in by the torch CUDA wheels) is loaded before TensorFlow,
     because loading it after TF segfaults (see _preload_triton).
  6. Graph mode only: TF_USE_LEGACY_KERAS=1 (when tf_keras is installed) so
     that tf.layers / tf.keras are the graph-capable Keras 2, as in TF 1.13;
     Keras 3 (TF >= 2.16 default) has neither.
"""
import ast
import builtins
import faulthandler
import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
import types

_HERE = os.path.dirname(os.path.abspath(__file__))
TF_MODE = os.environ.get("KIT_SHIM_TF_MODE", "graph").strip().lower()
if TF_MODE not in ("graph", "eager"):
  raise SystemExit("KIT_SHIM_TF_MODE must be 'graph' or 'eager', got %r"
                   % TF_MODE)


def _log(msg):
  sys.stderr.write("[kit_shim] %s\n" % msg)


# --------------------------------------------------------------------------
# 1. pip: restore get_installed_distributions (removed in pip 21.3)
# --------------------------------------------------------------------------
class _Dist(object):
  def __init__(self, key, version):
    self.key = key
    self.project_name = key
    self.version = version


def _get_installed_distributions(*args, **kwargs):
  try:
    from importlib import metadata
    return [_Dist((d.metadata["Name"] or "").lower(), d.version)
            for d in metadata.distributions()]
  except Exception:  # pragma: no cover - best effort only
    return []


def _patch_pip():
  try:
    import pip
    import pip._internal.utils.misc as misc
  except Exception:
    # No (usable) pip: provide just enough of a fake one for the kit.
    for name in ("pip", "pip._internal", "pip._internal.utils",
                 "pip._internal.utils.misc"):
      sys.modules.setdefault(name, types.ModuleType(name))
    misc = sys.modules["pip._internal.utils.misc"]
    pip = sys.modules["pip"]
  if not hasattr(misc, "get_installed_distributions"):
    misc.get_installed_distributions = _get_installed_distributions
  if not hasattr(pip, "get_installed_distributions"):
    pip.get_installed_distributions = _get_installed_distributions


# --------------------------------------------------------------------------
# 2. data_pb2: rebuild from its own serialized descriptor if protobuf refuses
#    to execute the old generated code.
# --------------------------------------------------------------------------
def _serialized_descriptor_from_source(path):
  """Return the bytes of `serialized_pb=...` found in an old *_pb2.py file."""
  with open(path, "r", encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      for kw in node.keywords:
        if kw.arg == "serialized_pb":
          value = kw.value
          # Either a plain bytes/str literal or _b('...') (py2/3 compatibility function).
          if isinstance(value, ast.Call) and value.args:
            value = value.args[0]
          literal = ast.literal_eval(value)
          if isinstance(literal, str):
            literal = literal.encode("latin1")
          return literal
  raise ValueError("no serialized_pb found in %s" % path)


class _Pb2Loader(importlib.abc.Loader):
  def __init__(self, real_loader, origin):
    self._real = real_loader
    self._origin = origin

  def create_module(self, spec):
    return None

  def exec_module(self, module):
    try:
      self._real.exec_module(module)
      return
    except TypeError as e:
      if "Descriptors cannot be created directly" not in str(e):
        raise
    from google.protobuf import descriptor_pool
    from google.protobuf.internal import builder
    serialized = _serialized_descriptor_from_source(self._origin)
    pool = descriptor_pool.Default()
    try:
      file_desc = pool.AddSerializedFile(serialized)
    except TypeError:
      # Already registered by the failed attempt (same content): reuse it.
      from google.protobuf import descriptor_pb2
      fdp = descriptor_pb2.FileDescriptorProto.FromString(serialized)
      file_desc = pool.FindFileByName(fdp.name)
    if not hasattr(file_desc, "message_types_by_name"):
      file_desc = pool.FindFileByName(file_desc.name)
    ns = module.__dict__
    for k in list(ns):
      if not k.startswith("__"):
        del ns[k]
    ns["DESCRIPTOR"] = file_desc
    builder.BuildMessageAndEnumDescriptors(file_desc, ns)
    builder.BuildTopDescriptorsAndMessages(file_desc, module.__name__, ns)
    _log("rebuilt %s from its serialized descriptor (protobuf >= 4 refuses "
         "old generated code)" % os.path.basename(self._origin))


class _Pb2Finder(importlib.abc.MetaPathFinder):
  NAMES = ("data_pb2",)

  def find_spec(self, fullname, path=None, target=None):
    if fullname not in self.NAMES:
      return None
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    if spec is None or spec.origin is None:
      return spec
    spec.loader = _Pb2Loader(spec.loader, spec.origin)
    return spec


# --------------------------------------------------------------------------
# 3. tensorflow alias for client code (kit + submission)
# --------------------------------------------------------------------------
class _TFAlias(types.ModuleType):
  """Module returned by `import tensorflow` inside client code.

  Attribute lookup order: explicit overrides, then the preferred API
  (compat.v1 in graph mode, TF2 in eager mode), then the other one, then the
  real `tensorflow` package (for `tf.python`, private names, ...)."""

  def __init__(self, real, preferred, other, overrides):
    super(_TFAlias, self).__init__("tensorflow")
    d = self.__dict__
    d["_alias_sources"] = (preferred, other, real)
    d["_alias_overrides"] = overrides
    d["__path__"] = list(getattr(real, "__path__", []))
    d["__file__"] = getattr(real, "__file__", None)
    d["__version__"] = real.__version__
    d["__doc__"] = real.__doc__

  def __getattr__(self, name):
    overrides = self.__dict__["_alias_overrides"]
    if name in overrides:
      value = overrides[name]
    else:
      for src in self.__dict__["_alias_sources"]:
        try:
          value = getattr(src, name)
          break
        except AttributeError:
          continue
      else:
        mod = sys.modules.get("tensorflow." + name)
        if mod is None:
          raise AttributeError("module 'tensorflow' (kit_shim alias, mode=%s)"
                               " has no attribute %r" % (TF_MODE, name))
        value = mod
    self.__dict__[name] = value
    return value

  def __dir__(self):
    names = set(self.__dict__["_alias_overrides"])
    for src in self.__dict__["_alias_sources"][:2]:
      names.update(dir(src))
    return sorted(names)


_ALIAS = None


def _build_alias():
  global _ALIAS
  if _ALIAS is not None:
    return _ALIAS
  _preload_triton()
  import tensorflow as real_tf  # the genuine TF2 package
  v1 = real_tf.compat.v1
  # tf.compat.v1 / tf.compat.v2 must be the canonical API modules.
  overrides = {"compat": real_tf.compat}
  if TF_MODE == "graph":
    v1.disable_v2_behavior()
    preferred, other = v1, real_tf
    if _missing_estimator(v1):
      spec = importlib.util.spec_from_file_location(
          "_kit_shim_tf1_estimator", os.path.join(_HERE, "tf1_estimator.py"))
      estimator = importlib.util.module_from_spec(spec)
      sys.modules[spec.name] = estimator
      spec.loader.exec_module(estimator)
      overrides["estimator"] = estimator
  else:
    preferred, other = real_tf, v1
  _ALIAS = _TFAlias(real_tf, preferred, other, overrides)
  _log("client `import tensorflow` -> TF %s %s (%s)"
       % (real_tf.__version__,
          "compat.v1 + disable_v2_behavior()" if TF_MODE == "graph"
          else "eager TF2 API with compat.v1 fallback", TF_MODE))
  return _ALIAS


def _preload_triton():
  """Load triton's LLVM-based extension BEFORE TensorFlow.

  With TF 2.21 and triton 3.x (a dependency of the torch CUDA wheels) in one
  process, loading triton._C.libtriton after TensorFlow segfaults; the
  other order works.  torch imports triton lazily (torch._dynamo, e.g. from
  the first torch.optim optimizer), i.e. after the kit has imported TF, so a
  PyTorch model.py would crash.  Set KIT_SHIM_PRELOAD_TRITON=0 to skip."""
  if os.environ.get("KIT_SHIM_PRELOAD_TRITON", "1") == "0":
    return
  if "tensorflow" in sys.modules or "triton" in sys.modules:
    return
  try:
    if importlib.util.find_spec("triton") is None:
      return
    import triton._C.libtriton  # noqa: F401
  except Exception as e:  # pragma: no cover
    _log("could not preload triton (%s: %s)" % (type(e).__name__, e))


def _missing_estimator(v1):
  try:
    return not hasattr(v1.estimator, "Estimator")
  except Exception:
    return True


def _client_dirs():
  dirs = []
  for d in os.environ.get("KIT_SHIM_CLIENT_DIRS", "").split(os.pathsep):
    if d:
      dirs.append(os.path.join(os.path.realpath(d), ""))
  return tuple(dirs)


_CLIENT_DIRS = ()
# The shim's own files need the genuine TensorFlow even when they lie inside a client dir (the
# project's checkout run in place, as `tools bench` does with its own model.py): were boot.py a
# client, building the alias would import the alias.
_SHIM_DIR = os.path.join(os.path.realpath(_HERE), "")
_ORIG_IMPORT = builtins.__import__
_FILE_CACHE = {}


def _is_client(globals_):
  if not globals_:
    return False
  f = globals_.get("__file__")
  if not f:
    return False
  hit = _FILE_CACHE.get(f)
  if hit is None:
    real = os.path.realpath(f)
    hit = real.startswith(_CLIENT_DIRS) and not real.startswith(_SHIM_DIR)
    _FILE_CACHE[f] = hit
  return hit


def _shim_import(name, globals=None, locals=None, fromlist=(), level=0):
  if (level == 0 and (name == "tensorflow" or name.startswith("tensorflow."))
      and _is_client(globals)):
    if _ALIAS is None:
      _preload_triton()
    module = _ORIG_IMPORT(name, globals, locals, fromlist, level)
    if name == "tensorflow" or not fromlist:
      # `import tensorflow [as tf]`, `from tensorflow import X`,
      # `import tensorflow.a.b [as c]` -> top-level object is the alias.
      return _build_alias()
    return module
  return _ORIG_IMPORT(name, globals, locals, fromlist, level)


# --------------------------------------------------------------------------
def main(argv):
  global _CLIENT_DIRS
  if len(argv) < 2:
    raise SystemExit("usage: boot.py SCRIPT [ARGS...]")
  script = os.path.abspath(argv[1])
  if TF_MODE == "graph":
    # TF 2.16+ ships Keras 3, which has no graph mode and no tf.layers.
    # The legacy Keras 2 (package tf_keras) restores tf.compat.v1.layers and a
    # graph-mode tf.keras, like TF 1.13's.
    if ("TF_USE_LEGACY_KERAS" not in os.environ
        and importlib.util.find_spec("tf_keras") is not None):
      os.environ["TF_USE_LEGACY_KERAS"] = "1"
  _CLIENT_DIRS = _client_dirs() + (os.path.join(
      os.path.realpath(os.path.dirname(script)), ""),)
  faulthandler.enable()  # print a Python traceback on segfaults
  _patch_pip()
  sys.meta_path.insert(0, _Pb2Finder())
  builtins.__import__ = _shim_import
  sys.argv = [script] + list(argv[2:])
  sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` would do
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  main(sys.argv)
