"""Pure tensor numerics for orthogonal reparameterisation; nothing here knows about PEFT."""
