"""Fault injection: the network proxy, scenario files and the scenario runner."""
