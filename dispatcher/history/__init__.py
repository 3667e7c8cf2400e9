"""Cluster-wide job history: every run (``ced run``, API sync and async) on any instance.

Where things live, and why (ARCHITECTURE.md, "Job history"):

* :mod:`.records`: the record of one run (who, what, where, each host's outcome and its
  output capped at ``history_output_max``), its small summary, the filters;
* :mod:`.store`: the full records in the instance's own ``<state_dir>/history``, written
  atomically by whichever process ran the job (``ced`` or the API daemon), with retention
  by age and count that never scans more than the kept runs;
* :mod:`.shared`: the sealed summaries in etcd (``/<cluster>/jobs/``) that make every run
  visible from every instance; the API daemon publishes its instance's new summaries;
* :mod:`.owner`: the full record of another instance's run, fetched from that instance
  over the peer route (its certificate serial checked), or a plain "owner unreachable".
"""
