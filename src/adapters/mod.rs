//! Trait implementations that let ordinary Rust code use a `Matrix`.

mod api2;
