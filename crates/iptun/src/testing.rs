//! What the unit tests that need a network of their own share.

use std::process::Command;

/// Run `cmd` (split at spaces) and require that it succeeds.
pub fn run(cmd: &str) {
    let args: Vec<&str> = cmd.split_whitespace().collect();
    let status = Command::new(args[0]).args(&args[1..]).status();
    assert!(status.is_ok_and(|s| s.success()), "{cmd}");
}

/// Run `test` on a thread of its own in a network namespace of its own
/// (needs root), which goes with the thread; a panic fails the caller.
pub fn in_own_netns(test: impl FnOnce() + Send + 'static) {
    std::thread::spawn(|| {
        // SAFETY: affects only this thread (and what it spawns).
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare (root?)"
        );
        test();
    })
    .join()
    .unwrap();
}
