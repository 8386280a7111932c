"""The direct migration route for runc and plain processes: CRIU's images go straight to
the target, no archive of the memory on either side.

- :mod:`.relay`: byte pumps between CRIU's page-server sockets and the link between the
  two ctrmigs, hashing what flows toward the target.
- :mod:`.pages`: the target's ends (``criu page-server`` receiving a pre-copy dump, a
  loopback relay for ``criu lazy-pages``) and the check that the pages a restore uses are
  the bytes the source sent.
- :mod:`.lazy`: ``criu lazy-pages`` beside a restore (post-copy).
- :mod:`.route`: the migration itself (pre-copy and post-copy), locally or over ssh.
"""
