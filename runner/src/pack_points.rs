//! SQL aggregate `pack_points(step, value)`: the (step, value) pairs of a group, in the order SQLite feeds
//! them, as one blob of little-endian (i64, f64) pairs. A metric history then comes back as one row per
//! run instead of one row per point (and without formatting every float as text, as `json_group_array`
//! does), which is what makes loading the curves of 100 runs take milliseconds.
//!
//! Registered on every pooled connection ([`register`]) through the raw handle sqlx exposes; the C
//! callbacks only touch memory SQLite hands them.

use std::ffi::c_int;
use std::ptr::{null_mut, NonNull};

use libsqlite3_sys as ffi;

/// Bytes per packed point.
pub const POINT_BYTES: usize = 16;

unsafe extern "C" fn step(
    ctx: *mut ffi::sqlite3_context,
    argc: c_int,
    argv: *mut *mut ffi::sqlite3_value,
) {
    // SAFETY: SQLite passes `argc` valid values and an aggregate context of the size asked, zeroed on
    // first use, that lives until `finalize`.
    unsafe {
        let slot = ffi::sqlite3_aggregate_context(ctx, std::mem::size_of::<*mut Vec<u8>>() as c_int)
            as *mut *mut Vec<u8>;
        if slot.is_null() || argc != 2 {
            ffi::sqlite3_result_error_nomem(ctx);
            return;
        }
        let args = std::slice::from_raw_parts(argv, 2);
        if ffi::sqlite3_value_type(args[1]) == ffi::SQLITE_NULL {
            return; // SQLite stores NaN as NULL: not a point.
        }
        if (*slot).is_null() {
            *slot = Box::into_raw(Box::new(Vec::with_capacity(1024 * POINT_BYTES)));
        }
        let buf = &mut **slot;
        buf.extend_from_slice(&ffi::sqlite3_value_int64(args[0]).to_le_bytes());
        buf.extend_from_slice(&ffi::sqlite3_value_double(args[1]).to_le_bytes());
    }
}

unsafe extern "C" fn finalize(ctx: *mut ffi::sqlite3_context) {
    // SAFETY: the aggregate context holds null or a Box this module leaked in `step`; it is taken once.
    unsafe {
        let slot = ffi::sqlite3_aggregate_context(ctx, 0) as *mut *mut Vec<u8>;
        if slot.is_null() || (*slot).is_null() {
            ffi::sqlite3_result_zeroblob(ctx, 0);
            return;
        }
        let buf = Box::from_raw(*slot);
        *slot = null_mut();
        ffi::sqlite3_result_blob64(
            ctx,
            buf.as_ptr().cast(),
            buf.len() as u64,
            ffi::SQLITE_TRANSIENT(),
        );
    }
}

/// Register `pack_points` on one connection.
pub fn register(db: NonNull<ffi::sqlite3>) -> Result<(), String> {
    // SAFETY: `db` is a live connection handle held exclusively by the caller; the callbacks are plain fns.
    let rc = unsafe {
        ffi::sqlite3_create_function_v2(
            db.as_ptr(),
            c"pack_points".as_ptr(),
            2,
            ffi::SQLITE_UTF8 | ffi::SQLITE_DETERMINISTIC,
            null_mut(),
            None,
            Some(step),
            Some(finalize),
            None,
        )
    };
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(format!("registering pack_points failed (SQLite code {rc})"))
    }
}

/// The points of a `pack_points` blob, sorted by step.
pub fn unpack(blob: &[u8]) -> Vec<(i64, f64)> {
    let mut points: Vec<(i64, f64)> = blob
        .chunks_exact(POINT_BYTES)
        .map(|c| {
            let (s, v) = c.split_at(8);
            (
                i64::from_le_bytes(s.try_into().expect("8 bytes")),
                f64::from_le_bytes(v.try_into().expect("8 bytes")),
            )
        })
        .collect();
    // Walking the primary key feeds the aggregate in step order; make sure, cheaply, rather than trust it.
    if !points.is_sorted_by_key(|p| p.0) {
        points.sort_by_key(|p| p.0);
    }
    points
}
