"""hypercall_gen: renders tlfs_spec/ into C, Python and documentation."""
