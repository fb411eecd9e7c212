"""The class launcher: which methods it serves, how it makes the class, and what a class
that cannot be imported says."""

import os
import sys
import tempfile
import unittest

from plugd_plugin import StrategyPlugin, _handlers, launch


class Plain:
    def __init__(self, config):
        self.config = config

    def greet(self, who):
        return "%s %s" % (self.config["greeting"], who)

    def count(self):
        return 3

    # Named like the SDK's Plugin.register: a plain class's method all the same.
    def register(self, device):
        return "registered %s" % device

    def _hidden(self):
        return "no"


class Strat(StrategyPlugin):
    def on_tick(self, ctx):
        return ctx.tick["bid"]


class Launch(unittest.TestCase):
    def test_public_methods_of_a_plain_class_and_the_kind_methods_are_served(self):
        self.assertEqual(sorted(_handlers(launch.ClassPlugin(Plain))),
                         ["count", "greet", "register"])
        self.assertEqual(sorted(_handlers(launch.ClassPlugin(Strat))), ["on_tick"])

    def test_the_class_is_made_with_its_config_and_methods_take_what_they_take(self):
        p = launch.ClassPlugin(Plain)
        p.on_load({"greeting": "hi"})
        handlers = _handlers(p)
        self.assertEqual(handlers["greet"].fn("ann"), "hi ann")
        self.assertEqual(handlers["count"].fn(None), 3, "a method with no argument")
        self.assertEqual(handlers["register"].fn("lamp"), "registered lamp")

    def test_an_import_the_sandbox_refuses_names_the_path_and_the_manifest_key(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "guarded.py"), "w") as f:
                f.write("raise PermissionError(13, 'Permission denied', '/opt/models/w.bin')\n")
            sys.path.insert(0, d)
            try:
                p = launch.load("guarded:Model")
            finally:
                sys.path.remove(d)
        with self.assertRaises(Exception) as caught:
            p.on_load({})
        text = str(caught.exception)
        self.assertIn("/opt/models/w.bin", text)
        self.assertIn("sandbox.read_paths", text)

    def test_a_missing_class_is_named(self):
        p = launch.load("os:NoSuchClass")
        with self.assertRaises(Exception) as caught:
            p.on_load({})
        self.assertIn("has no class NoSuchClass", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
