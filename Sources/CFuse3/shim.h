// libfuse3's low-level API for Swift. FUSE_USE_VERSION must come before the header; what the header writes as macros
// (the versioned session loop, FUSE_ARGS_INIT) is wrapped here in functions Swift can call.
#ifndef CIRCUIT_CFUSE3_SHIM_H
#define CIRCUIT_CFUSE3_SHIM_H

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/// A session for `mountpoint`-less arguments `argv[0..argc)` (copied by libfuse) with these operations.
static inline struct fuse_session *circuit_fuse_session_new(int argc, char **argv, const struct fuse_lowlevel_ops *ops,
                                                          void *userdata) {
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct fuse_session *se = fuse_session_new(&args, ops, sizeof(*ops), userdata);
    fuse_opt_free_args(&args);
    return se;
}

/// Runs the multi-threaded loop with up to `max_threads` workers; returns when the session exits.
static inline int circuit_fuse_session_loop_mt(struct fuse_session *se, unsigned max_threads) {
    struct fuse_loop_config *config = fuse_loop_cfg_create();
    fuse_loop_cfg_set_max_threads(config, max_threads);
    fuse_loop_cfg_set_idle_threads(config, 4);
    int rc = fuse_session_loop_mt(se, config);
    fuse_loop_cfg_destroy(config);
    return rc;
}

/// Sets `direct_io` (no page cache: every read and write reaches the file system) on an open file.
static inline void circuit_fuse_set_direct_io(struct fuse_file_info *fi, uint64_t fh) {
    fi->direct_io = 1;
    fi->keep_cache = 0;
    fi->nonseekable = 1;
    fi->fh = fh;
}

static inline uint64_t circuit_fuse_fh(const struct fuse_file_info *fi) { return fi ? fi->fh : 0; }
static inline int circuit_fuse_flags(const struct fuse_file_info *fi) { return fi ? fi->flags : 0; }

#endif
