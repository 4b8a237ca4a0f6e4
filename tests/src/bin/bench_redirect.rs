fn main() { todo!("benchmark being written") }
