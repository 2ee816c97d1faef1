"""Run external programs on Butler datasets, once per data ID (``butlerfs run``).

The per-data-ID core (`wrapper.core.run_job`: `wrapper.workspace` + `wrapper.execute` +
a store function) knows nothing of the command line or of how inputs were found, so the
wrapper PipelineTask reuses it. Only `wrapper.inputs` (queries) and `wrapper.harvest`
(storing outputs) talk to `lsst.daf.butler`; `wrapper.run` drives a whole run. See
``docs/RUN.md``.
"""
