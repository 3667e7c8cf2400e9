"""Config generations: published by the leader, applied by every follower.

One module per job; the rest of the instance uses :class:`Syncer` only.

* :mod:`~dispatcher.ha.sync.syncer`: :class:`Syncer`, the coordinator (the ``ha-sync``
  thread, the member key, ``/ready``);
* :mod:`~dispatcher.ha.sync.publisher`: leader: catch up, scan, publish generation N+1
  through a fenced transaction;
* :mod:`~dispatcher.ha.sync.follower`: follower: watch the generation key, refuse
  generations from an older epoch, apply new ones with backoff;
* :mod:`~dispatcher.ha.sync.push`: the leader pushes each new generation (sealed head, new
  chunks, changed files) to the followers over the mTLS peer route right after publishing;
  a follower applies it only when it is the head etcd holds, under the checks a fetch
  passes, and answers once it is applied (``sync_ack`` counts the answer at once);
* :mod:`~dispatcher.ha.sync.fetcher`: fetch changed files from a peer over mTLS and verify
  size and sha256 against the manifest (pushed files are checked the same way);
* :mod:`~dispatcher.ha.sync.swapper`: stage next to each target, fsync, rename into place
  keys first, remove what the generation no longer has, clean leftover stage directories;
* :mod:`~dispatcher.ha.sync.serving`: serve this member's generation files to peers;
* :mod:`~dispatcher.ha.sync.state`: the applied generation (``<state_dir>/sync/applied.json``,
  written again each tick until it succeeds) and the newest epoch seen (``epoch.json``);
* :mod:`~dispatcher.ha.sync.store`: the generation in the store: a small head under
  ``/<cluster>/generation`` and content-addressed manifest chunks under
  ``/<cluster>/generation-chunks/`` (one changed agent rewrites one chunk), published in
  fenced transactions within etcd's default limits, old chunks collected.

``/ready`` (:meth:`Syncer.ready_problem`) answers 200 only while this instance runs the
generation last published (a leader: once caught up); there is no timer: a diverged
instance says so in ``/status`` (``sync``) and stays out of the load balancer until it
converges.

The manifest model (logical paths, :class:`~dispatcher.ha.manifest.Generation`) is
:mod:`dispatcher.ha.manifest`.

Leader: every leader-only write goes through the fenced writer, which marks the state
dirty; once no leader-only operation is running (and 50 ms passed since the last write),
the leader scans its files and, if the manifest changed, publishes generation N+1 (head
under ``/<cluster>/generation``, changed chunks) through fenced transactions (it applies only while the leader
key's create revision is the leader's epoch). It also rescans every 2 s (files edited by
hand are published too) and republishes when the key in the store is not the one it wrote.

A newly elected leader first *catches up*: when the published generation is not the one
its files hold, it fetches that generation from the members that applied it (the old
leader may be gone); until then leader-only work is refused ("catching up"). If no member
can serve it within three lease TTLs the leader publishes its own files (logged
``sync-diverged``). Then it publishes N+1 under its own epoch, so followers, which refuse
generations from an epoch older than the newest they have seen, follow the new leader.

Follower (``sync_mode = push``): for each new generation (pushed by the leader, else
brought by its watch) it diffs the manifest against its files, takes the pushed files
that match the manifest, fetches every other changed file from the leader (then from any member that applied the
generation) with ``GET /cluster/files/<path>?generation=N`` over mTLS (up to four files at
once, each lane on its own kept-alive connection), verifies size and sha256, writes each into a stage directory next to its target (same filesystem) and fsyncs
it; only when *every* file is staged does it rename each into place (keys first), remove
the files the generation no longer has, fsync the directories and verify the whole manifest
again. A crash leaves old files, new files or leftover stage directories, never a partial
file; the applied generation is recorded (in ``<state_dir>/sync/applied.json`` and the
member key) only after the swap, so a restarted follower diffs again and converges.
Leftover stage directories are removed at start. With ``sync_mode = shared-fs`` there is
nothing to copy: the generation is recorded.
"""

from dispatcher.ha.sync.serving import cert_serial
from dispatcher.ha.sync.state import SyncError
from dispatcher.ha.sync.syncer import Syncer

__all__ = ["SyncError", "Syncer", "cert_serial"]
