"""Static analysis of the compiled GPU code, without a GPU: beside the backends, not among them.

* :mod:`.compile`: the ahead-of-time compile specs each Triton kernel module lists
  (:class:`~.compile.CompileSpec`) and how a launch specialises them;
* :mod:`.sass`: resource use and instruction mix read from machine code (``cuobjdump``);
* :mod:`.kernel_report`: ``python -m fastres.analysis.kernel_report``, every configuration
  compiled for every target and checked.

Nothing here is imported by dispatch or the ops at run time; the kernel modules import only
:mod:`.compile` (no dependencies) to declare their specs.
"""
