#![no_std]
// Lets tools that expect a library target (clippy, docs) see the crate; the programs are in main.rs.
