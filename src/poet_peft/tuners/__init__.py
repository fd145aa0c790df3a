"""The PEFT tuners of poet-peft, one package per method, in PEFT's own layout."""
