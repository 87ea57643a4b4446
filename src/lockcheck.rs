//! The lock discipline of a connection, checked.
//!
//! A connection has three mutexes: `inbox` and `outbox` (shared by its tokio task and
//! the loop thread) and the loop thread's own `PyState`. The rule, for every thread:
//!
//! 1. **Never two at once.** While a thread holds one connection lock it takes no other
//!    connection lock (of this connection or another one). The only lock that may be
//!    taken under a connection lock is the hub's queue (`Hub::push`), which is a leaf:
//!    nothing is locked and no Python runs while it is held.
//! 2. **No Python under a connection lock.** Calling into Python can run arbitrary code
//!    (future callbacks, `__del__`, the garbage collector, a logging handler) that may
//!    come back into the same connection and take the same lock: a parking_lot mutex is
//!    not reentrant, so the loop thread would park forever with the GIL held and the
//!    whole process would stop (issue 9). Dropping a Python object counts as calling
//!    Python: take it out of the state, release the lock, then drop it.
//!
//! So every method takes the lock, moves values in or out, releases it, and only then
//! builds Python objects or resolves futures. See docs/architecture.md.
//!
//! With `debug_assertions` (cargo test) or the `lock-check` feature (the build the test
//! suite runs against, see .ci/run), [`ConnMutex::lock`] panics if the thread already
//! holds a connection lock, and [`assert_unlocked`] (called before every call into
//! Python from the bridge) panics if it holds one: a violation fails the tests instead
//! of deadlocking in production. Without them both compile to the plain mutex.

use std::ops::{Deref, DerefMut};

#[cfg(any(debug_assertions, feature = "lock-check"))]
mod held {
    use std::cell::Cell;

    thread_local! {
        /// What connection lock this thread holds, if any (its type name).
        pub static HELD: Cell<Option<&'static str>> = const { Cell::new(None) };
    }
}

/// A mutex that is one of a connection's locks: see the module documentation.
#[derive(Default)]
pub struct ConnMutex<T> {
    inner: parking_lot::Mutex<T>,
}

/// The guard of a [`ConnMutex`]; releases the lock (and its record) on drop.
pub struct ConnGuard<'a, T> {
    guard: parking_lot::MutexGuard<'a, T>,
}

impl<T> ConnMutex<T> {
    pub fn new(value: T) -> Self {
        Self {
            inner: parking_lot::Mutex::new(value),
        }
    }

    /// Lock it.
    ///
    /// # Panics
    /// With lock checking on, if this thread already holds a connection lock.
    #[inline]
    pub fn lock(&self) -> ConnGuard<'_, T> {
        #[cfg(any(debug_assertions, feature = "lock-check"))]
        held::HELD.with(|h| {
            if let Some(other) = h.get() {
                panic!(
                    "lock discipline: taking a {} lock while holding a {other} lock \
                     (never hold two connection locks at once)",
                    std::any::type_name::<T>()
                );
            }
            h.set(Some(std::any::type_name::<T>()));
        });
        ConnGuard {
            guard: self.inner.lock(),
        }
    }
}

impl<T> Drop for ConnGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        #[cfg(any(debug_assertions, feature = "lock-check"))]
        held::HELD.with(|h| h.set(None));
    }
}

impl<T> Deref for ConnGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for ConnGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

/// Called before calling into Python (or dropping a Python object).
///
/// # Panics
/// With lock checking on, if this thread holds a connection lock; `what` names the call
/// in the message.
#[inline]
#[track_caller]
pub fn assert_unlocked(what: &str) {
    #[cfg(any(debug_assertions, feature = "lock-check"))]
    held::HELD.with(|h| {
        if let Some(lock) = h.get() {
            panic!("lock discipline: {what} while holding a {lock} lock (no Python under a connection lock)");
        }
    });
    #[cfg(not(any(debug_assertions, feature = "lock-check")))]
    let _ = what;
}

/// True if this thread holds a connection lock (always false without lock checking).
pub fn holding() -> bool {
    #[cfg(any(debug_assertions, feature = "lock-check"))]
    return held::HELD.with(|h| h.get().is_some());
    #[cfg(not(any(debug_assertions, feature = "lock-check")))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lock_at_a_time_is_fine() {
        let a = ConnMutex::new(1);
        let b = ConnMutex::new(2);
        {
            let g = a.lock();
            assert_eq!(*g, 1);
            assert!(holding());
        }
        assert!(!holding());
        *b.lock() += 1;
        assert_eq!(*b.lock(), 3);
        assert_unlocked("nothing held");
    }

    #[test]
    #[should_panic(expected = "never hold two connection locks")]
    fn two_locks_at_once_panic() {
        let a = ConnMutex::new(1u8);
        let b = ConnMutex::new(2u16);
        let _ga = a.lock();
        let _gb = b.lock();
    }

    #[test]
    #[should_panic(expected = "never hold two connection locks")]
    fn relocking_the_same_mutex_panics_instead_of_deadlocking() {
        let a = ConnMutex::new(1u8);
        let _g1 = a.lock();
        let _g2 = a.lock();
    }

    #[test]
    #[should_panic(expected = "no Python under a connection lock")]
    fn python_under_a_lock_panics() {
        let a = ConnMutex::new(());
        let _g = a.lock();
        assert_unlocked("calling Python");
    }
}
