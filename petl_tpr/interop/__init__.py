"""Bridges to other toolkits' formats. Import the submodule you need (`petl_tpr.interop.peft`)."""
