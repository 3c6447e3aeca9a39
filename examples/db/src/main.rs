farine::main!();
